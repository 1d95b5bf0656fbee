"""Headless Chromium for the browser tests: a Selenium driver with flags that render OHIF's WebGL viewports in
software (SwiftShader), and pixel statistics of a page element taken from a real screenshot."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pacs_testing import CHROMEDRIVER, CHROMIUM
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webelement import WebElement

# known to render OHIF v3 (cornerstone3D, WebGL2) without a GPU
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
    "--disable-background-networking",
    "--window-size=1600,1000",
)


@contextmanager
def chromium(log_path: Path | None = None, flags: Sequence[str] = ()) -> Iterator[webdriver.Chrome]:
    """A headless Chromium driven by chromedriver (with ``flags`` too); always quit, also when the test fails."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*HEADLESS_FLAGS, *flags):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(log_path) if log_path else None)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, path: Path | None = None) -> np.ndarray:
    """The page as an (h, w, 3) uint8 RGB array; also written to ``path`` as PNG when given."""
    png = driver.get_screenshot_as_png()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def element_pixels(driver: webdriver.Chrome, element: WebElement, path: Path | None = None) -> np.ndarray:
    """The screenshot pixels inside ``element``'s box (device pixels)."""
    page = screenshot(driver, path)
    ratio = float(driver.execute_script("return window.devicePixelRatio") or 1.0)
    r = element.rect
    x0, y0 = int(r["x"] * ratio), int(r["y"] * ratio)
    x1, y1 = int((r["x"] + r["width"]) * ratio), int((r["y"] + r["height"]) * ratio)
    return page[max(y0, 0) : y1, max(x0, 0) : x1]


def grey_std(pixels: np.ndarray) -> float:
    """Spread of the grey values: a rendered CT slice has many, a blank or uniform canvas none."""
    return float(pixels.astype(np.float32).mean(axis=2).std()) if pixels.size else 0.0


def coloured_fraction(pixels: np.ndarray, min_chroma: int = 40) -> float:
    """Fraction of pixels that are clearly not grey (max - min channel >= ``min_chroma``): a greyscale CT has
    none, a segmentation overlay makes them."""
    if not pixels.size:
        return 0.0
    p = pixels.astype(np.int16)
    chroma = p.max(axis=2) - p.min(axis=2)
    return float((chroma >= min_chroma).mean())


# ----- the MedSAM2 panel (apps/medsam2/ohif): helpers shared by tests/test_ohif_panel.py and bench/ -----

# a world point (mm, LPS) -> page coordinates (CSS px) in the active viewport, through cornerstone's own camera
WORLD_TO_PAGE = """
const v = window.services.cornerstoneViewportService.getCornerstoneViewport(
  window.services.viewportGridService.getActiveViewportId());
const p = v.worldToCanvas(arguments[0]), r = v.canvas.getBoundingClientRect();
return [r.left + p[0], r.top + p[1]];
"""
# where the image the active viewport shows lies: its ImagePositionPatient (cornerstone's metadata of the image)
SHOWN_IMAGE_POSITION = """
const v = window.services.cornerstoneViewportService.getCornerstoneViewport(
  window.services.viewportGridService.getActiveViewportId());
return Array.from(window.cornerstone.metaData.get('imagePlaneModule', v.getCurrentImageId()).imagePositionPatient);
"""


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    """Poll ``condition`` until it returns something other than None/False; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value is not None and value is not False:
                return value
        except Exception as e:  # noqa: BLE001 - the page re-renders while we look
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error!r})")


def panel_state(driver: webdriver.Chrome, key: str):
    """One field of the panel's state (``window.medsam2.state``)."""
    return driver.execute_script(f"return window.medsam2.state[{json.dumps(key)}]")


def click_panel(driver: webdriver.Chrome, name: str) -> None:
    """Click the panel's control ``data-medsam2=<name>``."""
    driver.find_element("css selector", f"[data-medsam2='{name}']").click()


def current_slice(driver: webdriver.Chrome) -> int:
    """The slice k (the server's k) the active viewport shows."""
    return driver.execute_script("return window.medsam2.bridge.currentSlice()")


def jump_to_slice(driver: webdriver.Chrome, k: int) -> None:
    driver.execute_script("return window.medsam2.bridge.jumpToSlice(arguments[0])", k)
    wait_for(lambda: current_slice(driver) == k, 10, f"slice {k}")


def open_medsam2_study(driver: webdriver.Chrome, server_url: str, study_uid: str, key_slice: int) -> None:
    """Open a study in the MedSAM2 mode, wait for the panel and the CT, show ``key_slice``."""
    driver.get(f"{server_url}/ohif/medsam2?StudyInstanceUIDs={study_uid}")
    wait_for(lambda: driver.execute_script("return window.medsam2 && window.medsam2.state.info && 1"), 90, "panel")
    wait_for(lambda: driver.execute_script("return window.medsam2.bridge.active() && 1"), 90, "the series shown")
    wait_for(lambda: grey_std(screenshot(driver)[300:600, 500:1000]) > 20, 60, "the CT rendered")
    jump_to_slice(driver, key_slice)
    time.sleep(1)  # OHIF's own segmentation panel may take the focus while the study opens


def drag_voxels(driver: webdriver.Chrome, image, voxels: list[tuple[float, float]], k: int) -> float:
    """Press the left button at the first (i, j) voxel of slice k of ``image`` (SimpleITK: the CT as written to
    the PACS, so the positions do not come from the viewer's own geometry), move through the others, release;
    returns the monotonic time of the release."""
    return drag_ijk(driver, image, [(i, j, k) for i, j in voxels])


def drag_ijk(driver: webdriver.Chrome, image, voxels: list[tuple[float, float, float]]) -> float:
    """:func:`drag_voxels` through (i, j, k) voxels, in the active viewport (any view of the series)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    worlds = [image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, v))) for v in voxels]
    points = [driver.execute_script(WORLD_TO_PAGE, list(w)) for w in worlds]
    actions = ActionBuilder(driver, duration=30)
    actions.pointer_action.move_to_location(*map(int, points[0])).pointer_down()
    for x, y in points[1:]:
        actions.pointer_action.move_to_location(int(x), int(y))
    actions.pointer_action.pointer_up()
    actions.perform()
    return time.monotonic()


# OHIF's MPR layout; the viewport whose view-plane normal is the world axis arguments[0] (0 x: sagittal, 1 y:
# coronal, 2 z: axial) becomes the active one and moves its plane through the world point arguments[1]
SHOW_PLANE = """
const [axis, world] = arguments;
const vs = window.services.cornerstoneViewportService;
for (const id of window.services.viewportGridService.getState().viewports.keys()) {
  const v = vs.getCornerstoneViewport(id);
  const cam = v && v.getCamera();
  if (!cam || Math.abs(cam.viewPlaneNormal[axis]) < 0.99) continue;
  window.services.viewportGridService.setActiveViewportId(id);
  const n = cam.viewPlaneNormal;
  const d = [0, 1, 2].reduce((s, c) => s + (world[c] - cam.focalPoint[c]) * n[c], 0);
  const shift = p => p.map((x, c) => x + d * n[c]);
  v.setCamera({ focalPoint: shift(cam.focalPoint), position: shift(cam.position) });
  v.render();
  return id;
}
return null;
"""


def open_mpr(driver: webdriver.Chrome) -> None:
    """Switch the viewer to OHIF's MPR layout (axial, sagittal, coronal) and wait for its three viewports."""
    driver.execute_script("window.medsam2.bridge.commands.runCommand('toggleHangingProtocol', {protocolId: 'mpr'})")
    wait_for(
        lambda: driver.execute_script(
            "return window.services.viewportGridService.getState().viewports.size === 3 "
            "&& [...window.services.viewportGridService.getState().viewports.keys()].every("
            "id => window.services.cornerstoneViewportService.getCornerstoneViewport(id)?.getCamera?.())"
        ),
        60,
        "OHIF's MPR layout",
    )
    time.sleep(2)  # the volume loads into the three views


def show_plane(driver: webdriver.Chrome, image, world_axis: int, voxel: tuple[float, float, float]) -> str:
    """Make the MPR view across ``world_axis`` active, showing the plane through ``voxel`` (i, j, k) of
    ``image``; its viewport id."""
    world = list(image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, voxel))))
    viewport = wait_for(
        lambda: driver.execute_script(SHOW_PLANE, world_axis, world), 30, f"the view across {world_axis}"
    )
    time.sleep(0.5)
    return viewport


def shows_slice(driver: webdriver.Chrome, image, k: int) -> bool:
    """True when the active viewport shows slice k of ``image`` (by the shown image's position in the patient)."""
    shown = driver.execute_script(SHOWN_IMAGE_POSITION)
    expected = image.TransformIndexToPhysicalPoint((0, 0, int(k)))
    return all(abs(a - b) < 1e-3 for a, b in zip(shown, expected, strict=True))


# the panel's labelmap on the active series, slice k (sorted like the server's k) as base64 uint8 (i fastest)
_LABELMAP = """
const v = window.medsam2.bridge.active();
const seg = window.services.segmentationService.getSegmentation(window.medsam2.bridge.segmentationId(v));
if (!seg) return null;
const lm = seg.representationData.Labelmap;
const byRef = new Map(lm.referencedImageIds.map((r, n) => [r, lm.imageIds[n]]));
return v.grid.imageIds.map(id => {
  const d = window.cornerstone.cache.getImage(byRef.get(id)).voxelManager.getScalarData();
  let s = '';
  for (let n = 0; n < d.length; n += 8192) s += String.fromCharCode.apply(null, d.subarray(n, n + 8192));
  return btoa(s);
});
"""


def panel_labelmap(driver: webdriver.Chrome, image) -> np.ndarray | None:
    """The panel's labelmap on the active series as (k, j, i) uint8 on ``image``'s grid (SimpleITK), or None
    before the first answer."""
    slices = driver.execute_script(_LABELMAP)
    if slices is None:
        return None
    columns, rows = image.GetSize()[:2]
    return np.stack([np.frombuffer(base64.b64decode(b), np.uint8).reshape(rows, columns) for b in slices])
