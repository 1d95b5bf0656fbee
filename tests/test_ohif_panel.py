"""The MedSAM2 OHIF panel (``apps/medsam2/ohif/``) in OHIF's release, served by the app at /ohif/, in headless
Chromium, on the lung CT in a real Orthanc: real mouse drags with the panel's tools, and what reaches the server.

One browser and one opened study serve the whole module (OHIF takes ~15 s to open a study on these machines);
the tests run in file order and each says what it starts from. Screenshots: ``test-artifacts/ohif_panel/``
(``box_3d.png`` is ``docs/ohif_medsam2_panel.png``).
"""

from __future__ import annotations

import ast
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import SimpleITK as sitk
from browser_testing import (
    click_panel,
    current_slice,
    drag_ijk,
    drag_voxels,
    jump_to_slice,
    panel_labelmap,
    panel_state,
    shows_slice,
    wait_for,
)
from pacs_testing import CHROMEDRIVER, CHROMIUM, CtSeries, Orthanc, lung_ct, require, write_ct_series

from conftest import ARTIFACTS, Server, start_server, stop_server
from sam2_testing import small_config_file

SHOTS = ARTIFACTS / "ohif_panel"
LABELS = {"lesion": 1, "organ": 2}
# the lung2 nodule (demo slices 15-25, i 318-404, j 333-398 at 512 px) in a slab from demo slice 10, shrunk to 256
FIRST_SLICE = 10
KEY_SLICE = 10  # demo slice 20
NODULE_BOX = (157, 164, 204, 202)  # x0, y0, x1, y1 = i0, j0, i1, j1

PENDING = "return window.medsam2.imageState().pending.length"


@dataclass
class PanelSession:
    orthanc: Orthanc
    ct: CtSeries
    server: Server
    driver: object
    console: list = field(default_factory=list)


@pytest.fixture(scope="module")
def panel(tmp_path_factory, random_checkpoint) -> Iterator[PanelSession]:
    """Orthanc with the lung CT slab, the app on it, and Chromium showing the study in the MedSAM2 mode at the
    key slice, the panel connected."""
    require([CHROMIUM, CHROMEDRIVER], "Chromium and chromedriver (Debian chromium, chromium-driver)")
    from browser_testing import chromium, open_medsam2_study, screenshot

    tmp = tmp_path_factory.mktemp("ohif_panel")
    SHOTS.mkdir(parents=True, exist_ok=True)
    orthanc = Orthanc(tmp / "orthanc").start()
    try:
        ct = write_ct_series(lung_ct(first_slice=FIRST_SLICE), tmp / "ct")
        orthanc.upload(ct.files)
        conf = {
            "checkpoint": str(random_checkpoint),
            "model_config": str(small_config_file(tmp)),
            "window": "lung",
            "labels": json.dumps(LABELS, separators=(",", ":")),
        }
        server = start_server(orthanc.dicomweb, conf, tmp / "server.log")
        try:
            with chromium(SHOTS / "chromedriver.log") as driver:
                session = PanelSession(orthanc, ct, server, driver)
                try:
                    open_medsam2_study(driver, server.url, ct.study_uid, KEY_SLICE)
                    screenshot(driver, SHOTS / "opened.png")
                    yield session
                finally:
                    session.console += driver.get_log("browser")
                    (SHOTS / "browser_console.json").write_text(json.dumps(session.console, indent=1))
        finally:
            stop_server(server)
    finally:
        orthanc.stop()


def state(s: PanelSession, key: str):
    return panel_state(s.driver, key)


def click(s: PanelSession, name: str) -> None:
    click_panel(s.driver, name)


def drag(s: PanelSession, voxels: list[tuple[float, float]], k: int) -> float:
    assert shows_slice(s.driver, s.ct.image, k), f"the viewport does not show slice {k}"
    return drag_voxels(s.driver, s.ct.image, voxels, k)


def labelmap(s: PanelSession) -> np.ndarray | None:
    """The panel's labelmap as (k, j, i) uint8, or None before the first answer."""
    return panel_labelmap(s.driver, s.ct.image)


def infer_requests(s: PanelSession, model: str | None = None) -> list[dict]:
    """The /infer requests the server logged (MONAI Label logs each request's params)."""
    found = []
    for line in s.server.log.read_text().splitlines():
        if "Infer Request: " in line:
            request = ast.literal_eval(line.split("Infer Request: ", 1)[1])
            if model is None or request.get("model") == model:
                found.append(request)
    return found


def run_and_wait(s: PanelSession, before: int) -> dict:
    """Press Run and wait for the panel's answer; returns the new request the server logged."""
    click(s, "run")
    return answered(s, before)


def answered(s: PanelSession, before: int) -> dict:
    wait_for(lambda: len(infer_requests(s)) > before, 60, "the panel's request at the server")
    wait_for(lambda: not state(s, "busy"), 120, "the panel's answer")
    assert state(s, "error") is None, state(s, "error")
    return infer_requests(s)[-1]


def select_tool(s: PanelSession, tool: str, polarity: str = "foreground", dimension: str = "3d") -> None:
    for name in (dimension, polarity):
        click(s, name)
    if state(s, "tool") != tool:
        click(s, f"tool-{tool}")
    wait_for(lambda: state(s, "tool") == tool, 5, f"the {tool} tool")


def server_label(s: PanelSession, params: dict, model: str) -> np.ndarray:
    """What the server answers to ``params`` in a new session: (k, j, i)."""
    params = {**params, "client_id": f"replay-{time.monotonic_ns()}", "result_extension": ".nii.gz"}
    r = s.server.post(
        f"/infer/{model}", params={"image": s.ct.series_uid, "output": "image"}, data={"params": json.dumps(params)}
    )
    assert r.status_code == 200, r.text[:1000]
    path = SHOTS / "replay.nii.gz"
    path.write_bytes(r.content)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_box_drag_reaches_the_server_in_voxels_of_the_shown_slice_and_its_3d_answer_is_overlaid(panel):
    """Live mode, Box tool, 3D: a drag around the nodule on the key slice sends that box (voxel indices of the
    server's image, the slice shown), and the labelmap becomes the server's answer voxel for voxel."""
    from browser_testing import coloured_fraction, element_pixels, screenshot

    s = panel
    before = len(infer_requests(s))
    select_tool(s, "box")
    s.driver.find_element("css selector", "[data-medsam2='live']").click()
    assert state(s, "live") is True
    x0, y0, x1, y1 = NODULE_BOX
    released = drag(s, [(x0, y0), ((x0 + x1) / 2, (y0 + y1) / 2), (x1, y1)], KEY_SLICE)
    request = answered(s, before)
    overlay = wait_for(lambda: (m := labelmap(s)) is not None and m.any() and m, 30, "the overlay")
    timing = state(s, "lastRun")["timing"]
    print(json.dumps({"measure": "ohif_box_drag_to_overlay", **timing, "image": "256x256x20"}))
    assert 0 < timing["prompt_to_overlay_s"] <= time.monotonic() - released
    s.driver.find_element("css selector", "[data-medsam2='live']").click()

    assert request["model"] == "medsam2_3d" and request["image"] == s.ct.series_uid
    (prompt,) = request["prompts"]
    assert prompt["label"] == "lesion" and prompt["slice"] == KEY_SLICE
    assert np.abs(np.array(prompt["box"]) - np.array(NODULE_BOX)).max() <= 1, prompt["box"]
    assert request["correction"] is False and request["client_id"].startswith("ohif-")
    # a changed-region answer (C1): the overlay was empty, so the box of the answer's voxels, gzip NRRD
    assert request["changed_since"] == "empty" and request["axis"] == "axial"
    run = state(s, "lastRun")
    assert run["answer"]["changed_region"]["since"] == "empty", run["answer"]
    assert run["bytes"] < overlay.size // 4, run["bytes"]  # the whole label would be one byte a voxel

    expected = server_label(s, {"prompts": request["prompts"]}, "medsam2_3d")
    assert overlay.shape == expected.shape
    assert np.array_equal(overlay, expected)
    assert np.count_nonzero(overlay.any(axis=(1, 2))) > 1  # propagated beyond the key slice
    viewport = s.driver.find_element("css selector", "[data-viewport-uid]")
    assert coloured_fraction(element_pixels(s.driver, viewport)) > 0.01
    screenshot(s.driver, SHOTS / "box_3d.png")


def test_scribble_and_lasso_reach_the_server_as_drawn(panel):
    """Background scribble then foreground lasso (2D) on the key slice: each request carries the stroke's
    voxels in order, on the slice shown; the 2D answer changes that slice only."""
    s = panel
    stroke = [(150.0, 150.0), (165.0, 158.0), (180.0, 170.0)]
    shown_id = s.driver.execute_script("return window.medsam2.imageState().answerIds.get(2)")
    assert shown_id == state(s, "lastRun")["answer"]["answer_id"]
    before = len(infer_requests(s))
    select_tool(s, "scribble", polarity="background")
    drag(s, stroke, KEY_SLICE)
    request = run_and_wait(s, before)
    (prompt,) = request["prompts"]
    assert prompt["slice"] == KEY_SLICE and request["correction"] is True
    assert request["changed_since"] == shown_id  # only what changed since the answer the overlay shows
    drawn = np.array(prompt["background_scribbles"][0])
    assert len(drawn) >= 3
    assert np.abs(drawn[0] - stroke[0]).max() <= 1.5 and np.abs(drawn[-1] - stroke[-1]).max() <= 1.5

    lasso = [(160.0, 170.0), (200.0, 172.0), (198.0, 200.0), (162.0, 198.0), (160.0, 171.0)]
    before_map = labelmap(s)
    before = len(infer_requests(s))
    select_tool(s, "lasso", polarity="foreground", dimension="2d")
    drag(s, lasso, KEY_SLICE)
    request = run_and_wait(s, before)
    assert request["model"] == "medsam2_2d"
    (prompt,) = request["prompts"]
    assert prompt["slice"] == KEY_SLICE
    outline = np.array(prompt["foreground_lasso"][0])
    assert len(outline) >= 4 and np.abs(outline[0] - lasso[0]).max() <= 1.5
    after = labelmap(s)
    changed = np.nonzero((after != before_map).any(axis=(1, 2)))[0].tolist()
    assert changed == [KEY_SLICE]
    assert state(s, "lastRun")["bytes"] < 64 * 1024  # a 2D answer never carries the whole volume
    inside = after[KEY_SLICE, 175:195, 165:195]
    assert (inside == LABELS["lesion"]).all()  # a lasso alone on a slice is that slice's mask, pixel exact


def test_undo_and_redo_restore_the_overlays(panel):
    """After box (3D), scribble (3D) and lasso (2D), Ctrl+Z twice brings back the overlay of the box answer exactly;
    the Redo button goes forward again; the server's session steps with each (undo/redo requests)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    s = panel
    states = [labelmap(s)]
    history = s.driver.execute_script("return window.medsam2.imageState().done.length")
    assert history == 3  # box (3D), scribble (3D), lasso (2D)
    before = len(infer_requests(s))
    for _ in range(2):
        ActionChains(s.driver).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()
        wait_for(lambda n=before: len(infer_requests(s)) > n, 30, "the undo at the server")
        wait_for(lambda: not state(s, "busy"), 60, "the undo")
        before = len(infer_requests(s))
        states.append(labelmap(s))
    undos = infer_requests(s)[-2:]
    assert [r.get("undo") for r in undos] == [True, True] and state(s, "error") is None
    box_answer = server_label(s, {"prompts": infer_requests(s, "medsam2_3d")[0]["prompts"]}, "medsam2_3d")
    assert np.array_equal(states[-1], box_answer)
    assert not np.array_equal(states[0], states[-1])
    click(s, "redo")
    wait_for(lambda: len(infer_requests(s)) > before, 30, "the redo at the server")
    wait_for(lambda: not state(s, "busy"), 60, "the redo")
    assert infer_requests(s)[-1].get("redo") is True and state(s, "error") is None  # the server had it to redo
    assert not np.array_equal(labelmap(s), box_answer)


def test_confidence_list_jumps_to_its_slice(panel):
    """After a 3D answer the panel lists slices to check and every slice's confidence; a click shows the slice."""
    s = panel
    entries = s.driver.find_elements("css selector", "[data-medsam2='check-slices'] [data-slice]")
    assert entries, s.driver.find_element("css selector", ".medsam2Panel").text
    scores = s.driver.find_elements("css selector", "[data-medsam2='slice-confidence'] [data-slice]")
    assert len(scores) > 1
    for entry in (entries[0], scores[-1]):
        k = int(entry.get_attribute("data-slice"))
        entry.click()
        wait_for(lambda k=k: current_slice(s.driver) == k, 10, f"slice {k}")
        assert shows_slice(s.driver, s.ct.image, k)  # the slice at that position in the patient, not only by index


def test_saved_seg_comes_back_from_the_pacs_aligned(panel):
    """Save label: the labelmap goes to the server as NRRD on the viewer's grid, reaches Orthanc as a DICOM SEG
    in the study, and that SEG, read back on the CT's grid, is the labelmap voxel for voxel."""
    from lib.imaging.dicom_seg import read_dicom_seg

    s = panel
    shown = labelmap(s)
    assert shown is not None and shown.any()
    click(s, "save")
    wait_for(lambda: state(s, "status") == "Saved as the final label" or state(s, "error"), 60, "the save")
    assert state(s, "error") is None, state(s, "error")

    def segs() -> list[dict]:
        study = s.ct.study_uid
        return [x for x in s.orthanc.series_of_modality("SEG") if x["0020000D"]["Value"][0] == study]

    (seg,) = wait_for(segs, 60, "the SEG in Orthanc")
    (dataset,) = s.orthanc.instances_of_series(seg["0020000E"]["Value"][0])
    path = SHOTS / "saved_seg.dcm"
    dataset.save_as(path)
    back = sitk.GetArrayFromImage(read_dicom_seg(str(path), s.ct.image, LABELS))
    assert back.shape == shown.shape
    assert np.array_equal(back, shown)


def test_a_prompt_the_server_refuses_is_dropped_with_the_servers_message(panel):
    """A background click alone (3D), for a label the session does not have (nothing to remove it from): the
    server answers 422; the panel shows its detail, drops the drawing, keeps the overlay, and the next prompt
    runs. (In 2D the panel refines the session's label, `refine_from: "last"`, where a background click alone is
    a valid edit.)"""
    s = panel
    jump_to_slice(s.driver, KEY_SLICE)
    overlay = labelmap(s)
    before = len(infer_requests(s))
    s.driver.execute_script("window.medsam2.update({label: 'organ'})")
    select_tool(s, "click", polarity="background", dimension="3d")
    drag(s, [(40.0, 40.0)], KEY_SLICE)
    # cornerstone holds a mouse-down until it knows it is not half of a double click
    wait_for(lambda: s.driver.execute_script(PENDING) == 1, 10, "the click as a prompt")
    click(s, "run")
    wait_for(lambda: len(infer_requests(s)) > before, 60, "the request at the server")
    message = wait_for(lambda: state(s, "error"), 60, "the server's message in the panel")
    assert message.startswith("Not used: ") and "background" in message.lower(), message
    assert s.driver.execute_script(PENDING) == 0
    assert np.array_equal(labelmap(s), overlay)
    s.driver.execute_script("window.medsam2.update({label: 'lesion'})")
    select_tool(s, "click", polarity="foreground", dimension="2d")
    drag(s, [(175.0, 180.0)], KEY_SLICE)
    wait_for(lambda: s.driver.execute_script(PENDING) == 1, 10, "the click as a prompt")
    request = run_and_wait(s, len(infer_requests(s)))
    assert request["prompts"][0]["foreground"] == [[175, 180]]


def test_2d_prompts_go_one_slice_a_request_and_build_up_on_their_slice(panel):
    """2D boxes on two slices, then Run: one request a slice (the server answers one slice at a time). A
    background click later on one of them is sent with that slice's box: the server's 2D starts each request
    afresh, so the panel sends everything drawn there."""
    s = panel
    select_tool(s, "box", dimension="2d")
    before = len(infer_requests(s))
    for k in (KEY_SLICE + 2, KEY_SLICE + 4):
        jump_to_slice(s.driver, k)
        drag(s, [NODULE_BOX[:2], NODULE_BOX[2:]], k)
    wait_for(lambda: s.driver.execute_script(PENDING) == 2, 10, "two boxes as prompts")
    click(s, "run")
    wait_for(lambda: len(infer_requests(s)) >= before + 2, 60, "two requests")
    wait_for(lambda: not state(s, "busy"), 60, "the answers")
    assert state(s, "error") is None, state(s, "error")
    first, second = infer_requests(s)[before : before + 2]
    assert [r["model"] for r in (first, second)] == ["medsam2_2d"] * 2
    assert sorted(r["prompts"][0]["slice"] for r in (first, second)) == [KEY_SLICE + 2, KEY_SLICE + 4]

    select_tool(s, "click", polarity="background", dimension="2d")
    drag(s, [(170.0, 175.0)], KEY_SLICE + 4)
    wait_for(lambda: s.driver.execute_script(PENDING) == 1, 10, "the click as a prompt")
    request = run_and_wait(s, len(infer_requests(s)))
    (prompt,) = request["prompts"]
    assert prompt["slice"] == KEY_SLICE + 4 and prompt["background"] == [[170, 175]]
    assert np.abs(np.array(prompt["box"]) - np.array(NODULE_BOX)).max() <= 1


def test_a_state_the_server_does_not_hold_is_asked_again_without_a_whole_volume(panel):
    """The overlay's state unknown to the server (a restart, an evicted session: 409): the panel asks the 2D
    request again against "empty" and writes the slice's box; no message, no whole volume."""
    s = panel
    jump_to_slice(s.driver, KEY_SLICE + 6)
    s.driver.execute_script("window.medsam2.imageState().answerIds.set(2, 'not-held.1')")
    select_tool(s, "box", dimension="2d")
    before = len(infer_requests(s))
    drag(s, [NODULE_BOX[:2], NODULE_BOX[2:]], KEY_SLICE + 6)
    wait_for(lambda: s.driver.execute_script(PENDING) == 1, 10, "the box as a prompt")
    click(s, "run")
    wait_for(lambda: len(infer_requests(s)) >= before + 2, 60, "the request and its retry")
    wait_for(lambda: not state(s, "busy"), 60, "the answer")
    assert state(s, "error") is None, state(s, "error")
    refused, retry = infer_requests(s)[before : before + 2]
    assert refused["changed_since"] == "not-held.1" and retry["changed_since"] == "empty"
    assert "refine_from" not in retry and state(s, "lastRun")["bytes"] < 64 * 1024


def test_a_drawing_without_a_label_is_refused_in_the_panel(panel):
    """No label chosen: the drawing is removed with a message, and nothing is sent."""
    s = panel
    jump_to_slice(s.driver, KEY_SLICE)
    s.driver.execute_script("window.medsam2.update({label: null})")
    before = len(infer_requests(s))
    select_tool(s, "box")
    drag(s, [(20.0, 20.0), (40.0, 40.0)], KEY_SLICE)
    message = wait_for(lambda: state(s, "error"), 10, "the panel's message")
    assert "label" in message.lower()
    time.sleep(1)
    assert len(infer_requests(s)) == before
    assert s.driver.execute_script(PENDING) == 0
    s.driver.execute_script("window.medsam2.update({label: 'lesion', error: null})")


# the panel's requests as they leave the page (URL, method, headers, body), recorded from now on
RECORD_REQUESTS = """
if (!window.__medsam2Sent) {
  window.__medsam2Sent = [];
  const send = window.fetch;
  window.fetch = (url, init = {}) => {
    const body = typeof init.body === 'string' ? init.body : null;
    window.__medsam2Sent.push({url: String(url), method: init.method || 'GET', headers: init.headers || {}, body});
    return send(url, init);
  };
}
window.__medsam2Sent.length = 0;
"""


def sent(s: PanelSession, path: str) -> list[dict]:
    return [r for r in s.driver.execute_script("return window.__medsam2Sent") if path in r["url"]]


def test_the_api_key_typed_in_the_panel_goes_with_every_request_and_the_heartbeat(panel):
    """No OHIF login here: the key typed in the panel goes as X-API-Key with the panel's requests (C5), and the
    panel's heartbeat (C6) posts the open series."""
    s = panel
    s.driver.execute_script(RECORD_REQUESTS)
    field_ = s.driver.find_element("css selector", "[data-medsam2='api-key']")
    field_.send_keys("key-123")
    wait_for(lambda: state(s, "apiKey") == "key-123", 5, "the key in the panel")
    s.driver.execute_script("window.medsam2.heartbeat.unsupported = false; return window.medsam2.heartbeat.send()")
    (beat,) = wait_for(lambda: sent(s, "/medsam2/heartbeat") or None, 10, "the heartbeat")
    assert beat["method"] == "POST" and json.loads(beat["body"]) == {"image": s.ct.series_uid}
    assert beat["headers"].get("X-API-Key") == "key-123"
    header = s.driver.execute_script("return window.services.userAuthenticationService.getAuthorizationHeader()")
    # OHIF's DICOMweb requests carry it too, as the one header OHIF's DICOMweb client keeps (docs/security.md)
    assert header == {"Authorization": "Bearer key-123"}
    s.driver.execute_script("window.medsam2.setApiKey('')")


def test_a_label_name_the_pacs_refuses_is_refused_in_the_panel_and_a_good_one_is_sent(panel):
    """C4: "liver/1" gets a message naming the allowed characters and no request; "liver (2)" is posted to
    /medsam2/labels/{series}/names, and the panel shows the server's answer (the new label, or its message)."""
    s = panel
    s.driver.execute_script(RECORD_REQUESTS)
    name = s.driver.find_element("css selector", "[data-medsam2='new-label-name']")
    name.send_keys("liver/1")
    click(s, "add-label")
    message = wait_for(lambda: state(s, "error"), 5, "the panel's message")
    assert "liver/1" in message and "letters, digits" in message, message
    assert not sent(s, "/names")
    name.clear()
    name.send_keys("liver (2)")
    click(s, "add-label")
    (post,) = wait_for(lambda: sent(s, "/names") or None, 10, "the new name at the server")
    assert post["url"].endswith(f"/medsam2/labels/{s.ct.series_uid}/names") and post["method"] == "POST"
    assert json.loads(post["body"]) == {"name": "liver (2)"}
    # the server keeps the name for the image (docs/api.md, saved labels and label names): the panel chooses it
    wait_for(lambda: state(s, "label") == "liver (2)", 10, "the new label chosen in the panel")
    assert "liver (2)" in [x["name"] for x in state(s, "labels")] and not state(s, "error")
    s.driver.execute_script("window.medsam2.update({label: 'lesion', error: null})")


def test_reset_clears_one_label_undoably_and_new_object_starts_it_over(panel):
    """Reset clears the chosen label only (Ctrl+Z brings it back, voxel for voxel); after it, or with New object
    chosen, the label's next 3D prompt is not a correction; then the panel is back to Refine."""
    s = panel
    jump_to_slice(s.driver, KEY_SLICE)
    before_reset = labelmap(s)
    assert (before_reset == LABELS["lesion"]).any()
    click(s, "reset-label")
    wait_for(lambda: not (labelmap(s) == LABELS["lesion"]).any(), 10, "the lesion cleared")
    after_reset = labelmap(s)
    assert np.array_equal(after_reset[before_reset != LABELS["lesion"]], before_reset[before_reset != LABELS["lesion"]])
    click(s, "undo")
    wait_for(lambda: np.array_equal(labelmap(s), before_reset), 10, "the lesion back")
    click(s, "redo")
    wait_for(lambda: np.array_equal(labelmap(s), after_reset), 10, "the reset again")

    select_tool(s, "box")
    for grow in (0, 3):  # the first box right after the reset, the second (a little larger) with New object chosen
        if grow:
            click(s, "new-object")
        before = len(infer_requests(s))
        x0, y0, x1, y1 = NODULE_BOX
        drag(s, [(x0 - grow, y0 - grow), (x1 + grow, y1 + grow)], KEY_SLICE)
        wait_for(lambda: s.driver.execute_script(PENDING) == 1, 10, "the box as a prompt")
        request = run_and_wait(s, before)
        assert request["correction"] is False, request  # after the reset: a new object
        assert s.driver.execute_script("return window.medsam2.state.newObject.size") == 0
    assert (labelmap(s) == LABELS["lesion"]).any()
    before = len(infer_requests(s))
    select_tool(s, "click", dimension="3d")
    drag(s, [(175.0, 180.0)], KEY_SLICE)
    wait_for(lambda: s.driver.execute_script(PENDING) == 1, 10, "the click as a prompt")
    assert run_and_wait(s, before)["correction"] is True  # Refine again


def test_refine_a_saved_label_sends_refine_from_once_and_shows_the_whole_label(panel):
    """A saved label chosen in the panel (an entry of C4's list; "final" is the SEG the save test put in the PACS):
    the next 3D prompt sends its `refine_from` without `changed_since` (the session starts over from a label the
    overlay does not hold) and the overlay becomes the server's answer; the prompt after it is a correction."""
    s = panel
    jump_to_slice(s.driver, KEY_SLICE)
    s.driver.execute_script(
        "window.medsam2.update({saved: [{tag: 'final', version: 1, source: 'pacs', refine_from: 'final'}]})"
    )
    click(s, "refine-saved")
    wait_for(lambda: state(s, "refineFrom") == "final", 5, "the saved label chosen")
    select_tool(s, "click")
    before = len(infer_requests(s))
    drag(s, [(170.0, 185.0)], KEY_SLICE)
    wait_for(lambda: s.driver.execute_script(PENDING) == 1, 10, "the click as a prompt")
    request = run_and_wait(s, before)
    assert request["refine_from"] == "final" and "changed_since" not in request and request["correction"] is False
    assert state(s, "refineFrom") is None
    expected = server_label(s, {"prompts": request["prompts"], "refine_from": "final"}, "medsam2_3d")
    assert np.array_equal(labelmap(s)[expected > 0], expected[expected > 0])
    before = len(infer_requests(s))
    drag(s, [(185.0, 176.0)], KEY_SLICE)
    wait_for(lambda: s.driver.execute_script(PENDING) == 1, 10, "the click as a prompt")
    request = run_and_wait(s, before)
    assert "refine_from" not in request and request["correction"] is True and request["changed_since"]


def test_ohifs_brush_paints_into_the_labelmap_the_panel_made(panel):
    """OHIF's own CircularBrush, on the panel's labelmap with the "organ" segment active: a stroke on the key
    slice paints organ voxels where it went, beside the panel's labels."""
    s = panel
    jump_to_slice(s.driver, KEY_SLICE)
    s.driver.execute_script(
        """
        const m = window.medsam2;
        m.bridge.commands.runCommand('setToolActiveToolbar', {toolName: 'CircularBrush', toolGroupIds: ['default']});
        """
    )
    # "organ" the active segment of the viewport, checked: OHIF may still be settling the segmentation the panel
    # made (its representations on the MPR viewports), which makes the first segment active again
    organ_active = """
        const m = window.medsam2, v = m.bridge.active(), id = m.bridge.segmentationId(v);
        const seg = window.services.segmentationService;
        seg.setActiveSegmentation(v.viewportId, id);
        seg.setActiveSegment(id, 2);
        return seg.getActiveSegment(v.viewportId)?.segmentIndex === 2;
        """
    wait_for(lambda: s.driver.execute_script(organ_active), 10, "organ active")
    time.sleep(0.5)
    wait_for(lambda: s.driver.execute_script(organ_active), 10, "organ still active")
    before = labelmap(s)
    drag(s, [(40.0, 60.0), (60.0, 60.0), (80.0, 60.0)], KEY_SLICE)
    painted = wait_for(lambda: (m := labelmap(s)) is not None and (m != before).any() and m, 20, "the brush stroke")
    changed = np.argwhere(painted != before)
    assert set(changed[:, 0].tolist()) == {KEY_SLICE}
    assert (painted[painted != before] == LABELS["organ"]).all()
    assert painted[KEY_SLICE, 60, 60] == LABELS["organ"]
    select_tool(s, "box")


MPR_CASES = [
    # world axis of the view (the CT is axis-aligned: i along x), the nodule's centre voxel, the box's corners
    pytest.param(0, (180, 183, 10), [(180, 164, 6), (180, 202, 14)], id="sagittal"),
    pytest.param(1, (180, 183, 10), [(157, 183, 6), (204, 183, 14)], id="coronal"),
]


@pytest.mark.parametrize(("axis", "centre", "corners"), MPR_CASES)
def test_a_box_on_an_mpr_view_lands_on_the_axis_clicked(panel, axis, centre, corners):
    """OHIF's MPR layout: a 3D box (±2 slices) on the sagittal / coronal view through the nodule is sent along
    that axis (slice = the voxel index across the view, box in the view's voxel axes), and the voxels it
    changes lie within those slices of that axis; the labelmap shows in all three views."""
    from browser_testing import open_mpr, show_plane

    s = panel
    if s.driver.execute_script("return window.services.viewportGridService.getState().viewports.size") != 3:
        open_mpr(s.driver)
    show_plane(s.driver, s.ct.image, axis, centre)
    select_tool(s, "box")
    s.driver.execute_script("window.medsam2.update({label: 'organ', range: 2})")
    before_map = labelmap(s)
    before = len(infer_requests(s))
    drag_ijk(s.driver, s.ct.image, corners)
    wait_for(lambda: s.driver.execute_script(PENDING) == 1 or state(s, "error"), 10, "the box as a prompt")
    request = run_and_wait(s, before)
    s.driver.execute_script("window.medsam2.update({label: 'lesion', range: null})")

    name = ("sagittal", "coronal")[axis]
    in_plane = [c for c in (0, 1, 2) if c != axis]
    (prompt,) = request["prompts"]
    assert request["axis"] == name and prompt["slice"] == centre[axis], request
    expected_box = [corners[0][in_plane[0]], corners[0][in_plane[1]], corners[1][in_plane[0]], corners[1][in_plane[1]]]
    assert np.abs(np.array(prompt["box"]) - np.array(expected_box)).max() <= 1, prompt["box"]
    assert request["slice_range"] == [centre[axis] - 2, centre[axis] + 2]
    after = labelmap(s)
    changed = np.argwhere(after != before_map)  # (k, j, i)
    assert len(changed), "the answer changed no voxel"
    across = changed[:, 2 - axis]
    assert across.min() >= centre[axis] - 2 and across.max() <= centre[axis] + 2, (across.min(), across.max())
    assert (after[after != before_map] == LABELS["organ"]).any()
    shown = s.driver.execute_script(
        "const id = window.medsam2.bridge.segmentationId(window.medsam2.bridge.active());"
        "return [...window.services.viewportGridService.getState().viewports.keys()].filter(v =>"
        " window.services.segmentationService.getSegmentationRepresentations(v, {segmentationId: id}).length).length"
    )
    assert shown == 3
    if name == "sagittal":  # a refine session on the sagittal view: a click corrects the box's answer
        before = len(infer_requests(s))
        s.driver.execute_script("window.medsam2.update({label: 'organ', range: 2})")
        select_tool(s, "click")
        drag_ijk(s.driver, s.ct.image, [(centre[0], centre[1], centre[2] + 1)])
        wait_for(lambda: s.driver.execute_script(PENDING) == 1, 10, "the click as a prompt")
        correction = run_and_wait(s, before)
        s.driver.execute_script("window.medsam2.update({label: 'lesion', range: null})")
        assert correction["axis"] == "sagittal" and correction["correction"] is True, correction
        clicked = np.array(correction["prompts"][0]["foreground"])
        assert np.abs(clicked - [[centre[1], centre[2] + 1]]).max() <= 1, clicked
    from browser_testing import screenshot

    screenshot(s.driver, SHOTS / f"mpr_{name}.png")  # mpr_sagittal.png is docs/ohif_sagittal_refine.png


def test_a_2d_prompt_on_a_sagittal_view_is_refused_in_the_panel(panel):
    """2D answers are axial: a 2D box on the sagittal view is removed with a message saying what to do."""
    from browser_testing import show_plane

    s = panel
    show_plane(s.driver, s.ct.image, 0, (180, 183, 10))
    select_tool(s, "box", dimension="2d")
    before = len(infer_requests(s))
    drag_ijk(s.driver, s.ct.image, [(180, 164, 6), (180, 202, 14)])
    message = wait_for(lambda: state(s, "error"), 10, "the panel's message")
    assert "axial" in message and "3D" in message, message
    assert s.driver.execute_script(PENDING) == 0 and len(infer_requests(s)) == before
    s.driver.execute_script("window.medsam2.update({error: null})")
