"""OHIF v3 next to a PACS: the OHIF build bundled in the monailabel 0.8.5 wheel (served by MONAI Label at /ohif/)
with this app on a real Orthanc, in headless Chromium, and the exact requests OHIF's MONAI Label panel sends.

The panel's source is the monailabel wheel's ``.venv/monailabel/plugins/ohifv3/extensions/monai-label/src``
(file:line references below are into that folder). What OHIF does, as read there and in the bundled
``monailabel/endpoints/static/ohif/app-config.js``:

- DICOMweb goes through MONAI Label's proxy with server-relative URLs (``qidoRoot``/``wadoRoot``
  ``/proxy/dicom/qido`` and ``/proxy/dicom/wado``), so the viewer works on whatever port the server listens on.
- The panel's server URL is separate: the cookie ``MONAILABEL_SERVER_URL``, default ``http://<page host>:8000/``
  (components/SettingsTable.tsx:25-28). A server on another port needs that cookie (or the URL typed into the
  panel and "connect" pressed); the test sets the cookie, as the panel itself does (SettingsTable.tsx:45-46).
- The viewer route is ``/ohif/monai-label?StudyInstanceUIDs=<uid>`` (modes/monai-label routeName 'monai-label').
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from pacs_testing import CHROMEDRIVER, CHROMIUM, REQUIRED, CtSeries, Orthanc, lung_ct, require, write_ct_series

from conftest import ARTIFACTS, Server, start_server, stop_server
from sam2_testing import small_config_file

SHOTS = ARTIFACTS / "ohif"
CLICK_SLICE = 10
FOREGROUND = [[150, 120, CLICK_SLICE]]  # (i, j, k) voxel indices, as the panel computes them (see below)
BACKGROUND = [[20, 20, CLICK_SLICE]]
LABEL = {"name": "nodule", "value": 1, "color": [255, 0, 0]}


@dataclass
class PacsApp:
    orthanc: Orthanc
    ct: CtSeries
    server: Server


@pytest.fixture(scope="module")
def pacs_app(tmp_path_factory, random_checkpoint) -> Iterator[PacsApp]:
    """Orthanc holding the lung CT series, and the app serving it through its DICOMweb datastore."""
    tmp = tmp_path_factory.mktemp("ohif")
    orthanc = Orthanc(tmp / "orthanc").start()
    try:
        ct = write_ct_series(lung_ct(), tmp / "ct")
        orthanc.upload(ct.files)
        conf = {
            "checkpoint": str(random_checkpoint),
            "model_config": str(small_config_file(tmp)),
            "window": "lung",
            # no spaces: the `monailabel` launcher script re-splits its arguments ($* unquoted)
            "labels": json.dumps({LABEL["name"]: LABEL["value"]}, separators=(",", ":")),
        }
        # start_server passes its studies argument on to --studies: a DICOMweb URL selects MONAI Label's
        # DICOMweb datastore (image id = SeriesInstanceUID)
        server = start_server(orthanc.dicomweb, conf, tmp / "server.log")
        try:
            yield PacsApp(orthanc, ct, server)
        finally:
            stop_server(server)
    finally:
        orthanc.stop()


def read_label(content: bytes) -> sitk.Image:
    """A label file from an /infer answer, NRRD or (gzipped) NIfTI, told apart by its first bytes."""
    suffix = ".nrrd" if content[:4] == b"NRRD" else ".nii.gz" if content[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(content)
        f.flush()
        return sitk.ReadImage(f.name)


def panel_point_prompt_infer(
    server: Server, model: str, image: str, foreground: list[list[int]], background: list[list[int]]
) -> requests.Response:
    """``POST /infer/<model>`` exactly as the panel's Point Prompts tab sends it for a ``deepgrow`` model.

    - URL: ``infer/`` + encodeURIComponent(model), query ``image`` then ``output=image``
      (services/MonaiLabelClient.js:29-31, ``output='image'`` default at :26); ``image`` is
      ``displaySet.SeriesInstanceUID`` of the active viewport (components/actions/PointPrompts.tsx:167-169).
    - Body: multipart form with the one field ``params`` (JSON), no file (MonaiLabelClient.js:43-49 ->
      ``api_post`` form=true -> ``constructFormData`` :106-119); header ``accept: application/json,
      multipart/form-data`` (:171-173); the answer is read as an arraybuffer (:48).
    - ``params``: the model's options from "Options / Configurations" (none unless the user saved some,
      PointPrompts.tsx:126-128, MonaiLabelPanel.tsx:402-404), ``foreground`` = the clicks of the selected
      label and ``background`` = the clicks of the 'background' row (PointPrompts.tsx:147-164), each
      ``worldToIndex(point).map(Math.round)``, i.e. (i, j, k) of the viewport's volume (:102, :120); for a
      ``dimension == 2`` model only the clicks on the slice of the last click (:153-161). No ``label``, no
      ``client_id``. Then ``result_extension='.nrrd'``, ``result_dtype='uint8'``, ``result_compress=false``
      (MonaiLabelClient.js:26, :34-38) and ``restore_label_idx=false`` (:41).
    - Answer: status 200 expected (PointPrompts.tsx:173); the body is parsed as NRRD by nrrd.js
      (MonaiLabelPanel.tsx:280 -> utils/SegmentationReader.js:18-39) and used as a Uint8Array of the
      labelmap's voxels (MonaiLabelPanel.tsx:315), any non-zero value becoming the selected segment because the
      model's type is ``deepgrow`` (PointPrompts.tsx:190, MonaiLabelPanel.tsx:327-328); for 2D only slice
      ``k`` of the labelmap is replaced (MonaiLabelPanel.tsx:346-355).
    """
    params = {
        "foreground": foreground,
        "background": background,
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        "result_compress": False,
        "restore_label_idx": False,
    }
    return server.post(
        f"/infer/{quote(model, safe='')}",
        params={"image": image, "output": "image"},
        files={"params": (None, json.dumps(params))},
        headers={"accept": "application/json, multipart/form-data"},
    )


def test_info_puts_both_models_in_the_point_prompts_tab(pacs_app):
    """The panel lists a model under Point Prompts only if its type is deepgrow/deepedit/vista3d
    (PointPrompts.tsx:272-281), reads label names and values from a dict (MonaiLabelPanel.tsx:169-176) and
    filters 2D clicks by ``dimension`` (PointPrompts.tsx:153)."""
    info = pacs_app.server.get("/info/").json()
    for model, dimension in (("medsam2_2d", 2), ("medsam2_3d", 3)):
        assert info["models"][model]["type"] == "deepgrow"
        assert info["models"][model]["dimension"] == dimension
        assert info["models"][model]["labels"] == {LABEL["name"]: LABEL["value"]}


@pytest.mark.parametrize("model", ["medsam2_3d", "medsam2_2d"])
def test_panel_point_prompts_on_a_dicomweb_series(pacs_app, model):
    series = pacs_app.ct.series_uid
    r = panel_point_prompt_infer(pacs_app.server, model, series, FOREGROUND, BACKGROUND)
    assert r.status_code == 200, r.text[:2000]
    label = read_label(r.content)
    image = pacs_app.ct.image
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-4)
    assert np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
    arr = sitk.GetArrayFromImage(label)  # (k, j, i)
    assert arr.dtype == np.uint8 and set(np.unique(arr).tolist()) <= {0, LABEL["value"]}
    labelled_slices = np.nonzero(arr.any(axis=(1, 2)))[0].tolist()
    assert CLICK_SLICE in labelled_slices
    if model == "medsam2_2d":
        assert labelled_slices == [CLICK_SLICE]
    else:
        assert len(labelled_slices) > 1  # propagated from the clicked (key) slice
    log = pacs_app.server.log.read_text()
    assert f"'model': '{model}', 'image': '{series}', 'foreground': {FOREGROUND}" in log


def test_panel_gets_the_nrrd_it_parses(pacs_app):
    """The panel asks for ``result_extension=.nrrd``, ``result_dtype=uint8``, ``result_compress=false``
    (MonaiLabelClient.js:34-38) and reads the answer as raw uint8 NRRD voxels of the viewport's volume."""
    r = panel_point_prompt_infer(pacs_app.server, "medsam2_3d", pacs_app.ct.series_uid, FOREGROUND, BACKGROUND)
    assert r.status_code == 200, r.text[:2000]
    header, _, data = r.content.partition(b"\n\n")
    assert header.startswith(b"NRRD"), r.content[:16]
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[1:] if ": " in line)
    assert fields["type"] in ("uint8", "unsigned char", "uchar")
    assert fields["encoding"] == "raw"
    assert [int(v) for v in fields["sizes"].split()] == list(pacs_app.ct.image.GetSize())
    assert len(data) == int(np.prod(pacs_app.ct.image.GetSize()))


@pytest.fixture(scope="module")
def saved_seg(pacs_app) -> dict:
    """A MedSAM2 3D label for the CT series saved as the final label: the DICOMweb datastore stores it in
    Orthanc as a DICOM SEG series of the same study. Returns that series' QIDO entry and the label (k, j, i)."""
    series = pacs_app.ct.series_uid
    params = {"label": LABEL["name"], "foreground": FOREGROUND, "client_id": "ohif-test"}
    r = pacs_app.server.post(
        "/infer/medsam2_3d", params={"image": series, "output": "image"}, data={"params": json.dumps(params)}
    )
    assert r.status_code == 200, r.text[:2000]
    assert sitk.GetArrayFromImage(read_label(r.content)).any()
    # MonaiLabelClient.save_label (MonaiLabelClient.js:61-76): PUT datastore/label?image=<id>, form fields
    # params (JSON) and label (the file); Slicer's form, with the label as NIfTI and tag=final (the default tag).
    # OHIF v3's panel in monailabel 0.8.5 has no button that calls save_label.
    label_info = {"label_info": [{"name": LABEL["name"], "idx": LABEL["value"], "color": LABEL["color"]}]}
    put = requests.put(
        f"{pacs_app.server.url}/datastore/label",
        params={"image": series, "tag": "final"},
        data={"params": json.dumps(label_info)},
        files={"label": ("label.nii.gz", r.content, "application/octet-stream")},
        timeout=300,
    )
    assert put.status_code == 200, f"{put.status_code} {put.text[:1000]}\n{pacs_app.server.log.read_text()[-4000:]}"

    def segs_in_study() -> list[dict]:  # the datastore may upload to the PACS after answering
        study = pacs_app.ct.study_uid
        return [s for s in pacs_app.orthanc.series_of_modality("SEG") if s["0020000D"]["Value"][0] == study]

    try:
        segs = wait_for(segs_in_study, 60, "the SEG series in Orthanc")
    except AssertionError as e:
        raise AssertionError(f"{e}\nserver log:\n{pacs_app.server.log.read_text()[-4000:]}") from None
    assert len(segs) == 1, segs
    return {"qido": segs[0], "label": sitk.GetArrayFromImage(read_label(r.content))}


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll ``condition`` until it returns an array or something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if isinstance(value, np.ndarray) or value:
                return value
        except Exception as e:  # noqa: BLE001 - stale elements etc. while the page re-renders
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error!r})")


def test_ohif_shows_the_study_and_the_medsam2_seg_over_the_ct(pacs_app, saved_seg):
    """Study list from Orthanc through the proxy; the MONAI Label mode renders the CT (pixels, not a sleep) with the
    server image's geometry; the panel connects; the saved SEG loads over the CT where the label is. Screenshots:
    test-artifacts/ohif/ (4_seg_on_ct.png is docs/ohif_medsam2.png)."""
    require([CHROMIUM, CHROMEDRIVER], "Chromium and chromedriver (Debian chromium, chromium-driver)")
    if importlib.util.find_spec("selenium") is None:
        (pytest.fail if REQUIRED else pytest.skip)("selenium is not installed (requirements-dev.txt)")
    from browser_testing import (
        AXIAL_VIEWPORT,
        chromium,
        coloured_fraction,
        element_pixels,
        grey_std,
        image_box,
        open_monai_label_viewer,
        overlay_iou,
        screenshot,
    )
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server, ct = pacs_app.server, pacs_app.ct
    started = time.monotonic()
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    console: list[dict] = []  # the browser's console messages (reading them empties chromedriver's buffer)
    with chromium(SHOTS / "chromedriver.log") as driver:
        try:
            # 1. the study list, from Orthanc through MONAI Label's DICOMweb proxy
            driver.get(server.url + "/ohif/")
            body = driver.find_element(By.TAG_NAME, "body")
            wait_for(lambda: "MEDSAM2-TEST" in body.text and "MS2-0001" in body.text, 60, "the study row")
            screenshot(driver, SHOTS / "1_study_list.png")

            # 2. the viewer in MONAI Label mode, the panel pointed at this server (its cookie, default port 8000)
            open_monai_label_viewer(driver, server.url, ct.study_uid)
            wait = WebDriverWait(driver, 60)
            axial_selector = AXIAL_VIEWPORT

            def axial():  # found anew each time: OHIF replaces the element when the viewport's data changes
                return driver.find_element(*axial_selector)

            for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Confirm and Hide']"):
                button.click()  # the "investigational use only" banner

            def image_area():  # the middle of the axial viewport: the CT, no text overlays or borders
                pixels = element_pixels(driver, axial())
                h, w = pixels.shape[:2]
                return pixels[int(h * 0.3) : int(h * 0.7), int(w * 0.2) : int(w * 0.8)]

            def rendered_ct():
                pixels = image_area()
                return pixels if grey_std(pixels) > 20 else None

            ct_pixels = wait_for(rendered_ct, 60, "the CT rendered in the axial viewport")
            assert coloured_fraction(ct_pixels) < 0.001  # a greyscale CT, nothing overlaid yet

            # the viewport's volume has the server image's geometry, so the panel's worldToIndex clicks are the
            # server's (i, j, k) and its labelmap voxels are the label file's voxels in the same order
            volumes = driver.execute_script(
                "return window.cornerstone.cache.getVolumes().map(v => ({origin: Array.from(v.origin),"
                " spacing: Array.from(v.spacing), direction: Array.from(v.direction),"
                " dimensions: Array.from(v.dimensions), imageId: (v.imageIds || [''])[0]}));"
            )
            ct_volume = next(v for v in volumes if ct.series_uid in v["imageId"])
            assert ct_volume["dimensions"] == list(ct.image.GetSize())
            assert np.allclose(ct_volume["origin"], ct.image.GetOrigin(), atol=1e-3)
            assert np.allclose(ct_volume["spacing"], ct.image.GetSpacing(), atol=1e-4)
            assert np.allclose(ct_volume["direction"], ct.image.GetDirection(), atol=1e-6)

            # connect the panel (the button next to the server URL; the panel does not connect by itself): it
            # shows the app's name and the Point Prompts tab (which lists deepgrow models)
            panel = wait.until(ec.presence_of_element_located((By.CLASS_NAME, "monaiLabelPanel")))
            assert panel.find_element(By.ID, "monailabelServerURL").get_attribute("value") == server.url + "/"
            panel.find_element(By.CSS_SELECTOR, "button.actionButton").click()
            wait_for(lambda: "MedSAM2" in panel.text and "Point Prompts" in panel.text, 30, "the connected panel")
            # on connecting, the panel adds its segmentation and colours it 1 s later in whatever viewport is
            # active then (MonaiLabelPanel.tsx, setTimeout 1000): a layout change before that crashes OHIF
            # ("Cannot set properties of null", setSegmentIndexColor); seen once under a loaded CI machine
            time.sleep(3)
            screenshot(driver, SHOTS / "2_viewer.png")

            # 3. one viewport (layout 1x1: the axial one), then the SEG series from the study browser: double-click
            # shows it alone, LOAD hydrates it over the CT. (Double-clicking it in the 3-viewport MPR layout makes
            # OHIF's viewports throw "Incompatible view refs" / "reading 'volumeId'": "Something went wrong".)
            driver.find_element(By.CSS_SELECTOR, "[data-cy='Layout']").click()
            wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-cy='Layout-0-0']"))).click()
            wait_for(
                lambda: len(driver.find_elements(By.CSS_SELECTOR, "[data-viewport-uid]")) == 1 and axial(),
                30,
                "the 1x1 layout with the axial viewport",
            )
            seg_description = saved_seg["qido"].get("0008103E", {}).get("Value", ["SEG"])[0]
            thumbnail = wait.until(
                ec.presence_of_element_located(
                    (By.XPATH, f"//*[@data-cy='study-browser-thumbnail-no-image'][.//*[text()='{seg_description}']]")
                )
            )
            ActionChains(driver).double_click(thumbnail).perform()

            def load_button_in_axial():  # each viewport showing the SEG alone has its own LOAD button
                box = axial().rect
                x0, x1 = box["x"], box["x"] + box["width"]
                buttons = driver.find_elements(By.XPATH, "//div[normalize-space()='LOAD']")
                return [b for b in buttons if x0 <= b.rect["x"] < x1 and b.is_displayed()]

            load = wait_for(load_button_in_axial, 60, "the SEG previewed in the axial viewport")[0]
            screenshot(driver, SHOTS / "3_seg_preview.png")
            ActionChains(driver).move_to_element(load).click().perform()

            def overlay_on_ct():
                pixels = image_area()
                coloured = coloured_fraction(pixels)
                chroma = pixels.astype(np.int16).max(axis=2) - pixels.astype(np.int16).min(axis=2)
                grey = pixels[chroma < 40]  # the CT between the overlay (the SEG preview alone is black there)
                ok = coloured > 0.05 and grey.size and grey.astype(np.float32).std() > 20
                return (coloured, pixels) if ok and not load_button_in_axial() else None

            coloured, _ = wait_for(overlay_on_ct, 60, "the SEG overlaid on the CT in the axial viewport")
            # the overlay is the label where the label is: the slice shown (OHIF shows slice 1 of 20 after loading;
            # the random model's mask barely changes between slices, so either end matches), as stored, matches the
            # screen much better than the same slice mirrored left-right or up-down (screen rows = j, columns = i:
            # LPS x (i) to the viewer's right, y (j) down)
            pixels = element_pixels(driver, axial())
            y0, y1, x0, x1 = image_box(pixels)
            shown = pixels[y0:y1, x0:x1]
            label = saved_seg["label"] > 0
            as_stored = max(overlay_iou(shown, label[k]) for k in (0, -1))
            mirrored = max(overlay_iou(shown, m) for k in (0, -1) for m in (label[k][:, ::-1], label[k][::-1, :]))
            print(f"overlay IoU as stored {as_stored:.3f}, mirrored {mirrored:.3f}")
            assert as_stored > 0.8 and as_stored > mirrored + 0.1, (as_stored, mirrored)
            time.sleep(1)  # a late error notification would show up now
            assert "went wrong" not in driver.find_element(By.TAG_NAME, "body").text
            console += driver.get_log("browser")
            errors = [e["message"] for e in console if "Error Boundary" in e["message"]]
            assert not errors, errors
            final = SHOTS / "4_seg_on_ct.png"
            screenshot(driver, final)
            assert coloured > 0.05
        except Exception:
            screenshot(driver, SHOTS / "failure.png")
            raise
        finally:
            (SHOTS / "browser_console.json").write_text(json.dumps(console + driver.get_log("browser"), indent=1))
    assert time.monotonic() - started < 180


def test_ohif_panel_point_prompt_run_in_the_browser(pacs_app):
    """The real panel: Point Prompts tab, model medsam2_2d (the first listed), label row, one click on the CT,
    Run. The server must receive exactly what :func:`panel_point_prompt_infer` sends, and the panel must then
    put the answer into its labelmap (today it cannot: the answer is NIfTI, see test_panel_gets_the_nrrd_it_parses).
    """
    require([CHROMIUM, CHROMEDRIVER], "Chromium and chromedriver (Debian chromium, chromium-driver)")
    if importlib.util.find_spec("selenium") is None:
        (pytest.fail if REQUIRED else pytest.skip)("selenium is not installed (requirements-dev.txt)")
    from browser_testing import AXIAL_VIEWPORT, chromium, grey_std, open_monai_label_viewer, screenshot
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server, ct = pacs_app.server, pacs_app.ct
    shots = SHOTS / "panel"
    shots.mkdir(parents=True, exist_ok=True)
    log_start = len(server.log.read_text())
    console: list[dict] = []
    with chromium() as driver:
        try:
            driver.get(server.url + "/ohif/")
            open_monai_label_viewer(driver, server.url, ct.study_uid)
            wait = WebDriverWait(driver, 60)
            axial_selector = AXIAL_VIEWPORT
            for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Confirm and Hide']"):
                button.click()
            driver.find_element(By.CSS_SELECTOR, "[data-cy='Layout']").click()
            wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-cy='Layout-0-0']"))).click()
            wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "[data-viewport-uid]")) == 1, 30, "1x1 layout")
            wait_for(
                lambda: grey_std(screenshot(driver)[300:600, 600:1000]) > 20, 60, "the CT in the 1x1 axial viewport"
            )
            panel = driver.find_element(By.CLASS_NAME, "monaiLabelPanel")
            panel.find_element(By.CSS_SELECTOR, "button.actionButton").click()
            wait_for(lambda: "Point Prompts" in panel.text, 30, "the connected panel")
            panel.find_element(By.XPATH, ".//label[normalize-space()='Point Prompts']").click()
            run = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "button[title='Run PointPrompts']")))
            label_row = f"//tr[td[normalize-space()='{LABEL['name']}']]"
            wait.until(ec.element_to_be_clickable((By.XPATH, label_row))).click()
            time.sleep(0.5)  # the probe tool is activated by the tab's handler
            axial = driver.find_element(*axial_selector)
            ActionChains(driver).move_to_element_with_offset(axial, 30, 10).click().perform()
            time.sleep(0.5)
            screenshot(driver, shots / "clicked.png")
            run.click()

            def infer_request() -> dict | None:
                for line in server.log.read_text()[log_start:].splitlines():
                    if "Infer Request: " in line and "medsam2_2d" in line:
                        return ast.literal_eval(line.split("Infer Request: ", 1)[1])
                return None

            request = wait_for(infer_request, 60, "the panel's /infer request in the server log")
            screenshot(driver, shots / "after_run.png")
            # what panel_point_prompt_infer sends, with the click the panel made (model and image from the URL)
            assert set(request) == {
                "model",
                "image",
                "foreground",
                "background",
                "result_extension",
                "result_dtype",
                "result_compress",
                "restore_label_idx",
            }, request
            assert request["model"] == "medsam2_2d" and request["image"] == ct.series_uid
            assert request["background"] == [] and len(request["foreground"]) == 1
            (i, j, k), size = request["foreground"][0], ct.image.GetSize()
            assert 0 <= i < size[0] and 0 <= j < size[1] and 0 <= k < size[2]
            assert (request["result_extension"], request["result_dtype"]) == (".nrrd", "uint8")
            assert request["result_compress"] is False and request["restore_label_idx"] is False

            def outcome() -> str | None:
                console.extend(driver.get_log("browser"))
                if any("not an NRRD file" in e["message"] for e in console):
                    return "not nrrd"
                text = driver.find_element(By.TAG_NAME, "body").text
                if "Failed to Run Inference" in text:
                    return "failed"
                counts = driver.execute_script(
                    "return window.cornerstone.cache.getVolumes()"
                    ".filter(v => (v.imageIds || [''])[0].startsWith('derived'))"
                    ".map(v => v.voxelManager.getCompleteScalarDataArray().reduce((n, x) => n + (x ? 1 : 0), 0));"
                )
                return "labelled" if any(counts) else None

            result = wait_for(outcome, 60, "the panel's answer handled")
            screenshot(driver, shots / "result.png")
            assert result == "labelled", result
        except Exception:
            screenshot(driver, shots / "failure.png")
            raise
        finally:
            (shots / "browser_console.json").write_text(json.dumps(console + driver.get_log("browser"), indent=1))
