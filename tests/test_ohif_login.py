"""The OHIF panel in front of a server with login on (docs/security.md#clients), in headless Chromium on a real
Orthanc: OHIF has no login of its own, so the viewer asks for an API key at start, before its study list asks
the server's DICOMweb proxy; with the key, the study opens, a box gives a 3D answer and the save becomes a DICOM
SEG in Orthanc. The key given in the address's fragment instead opens the study without a prompt and leaves the
address bar. The identity provider is tests/test_auth.py's (the server needs one to start with login on).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pacs_testing import CHROMEDRIVER, CHROMIUM, CtSeries, Orthanc, lung_ct, require, write_ct_series
from test_auth import ALL_ROLES, CLIENT_ID, LocalIdentityProvider, bearer

from conftest import ARTIFACTS, Server, start_server, stop_server
from lib.server.api_keys import add_key
from sam2_testing import small_config_file

pytestmark = [pytest.mark.server, pytest.mark.pacs, pytest.mark.browser]
SHOTS = ARTIFACTS / "ohif_login"
KEY_SLICE = 10
NODULE_BOX = (157, 164, 204, 202)  # the lung2 nodule in the slab (tests/test_ohif_panel.py)


@dataclass
class LoginSetup:
    orthanc: Orthanc
    ct: CtSeries
    server: Server
    api_key: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory, random_checkpoint) -> Iterator[LoginSetup]:
    require([CHROMIUM, CHROMEDRIVER], "Chromium and chromedriver (Debian chromium, chromium-driver)")
    tmp = tmp_path_factory.mktemp("ohif_login")
    SHOTS.mkdir(parents=True, exist_ok=True)
    idp = LocalIdentityProvider()
    orthanc = Orthanc(tmp / "orthanc").start()
    try:
        ct = write_ct_series(lung_ct(first_slice=KEY_SLICE), tmp / "ct")
        orthanc.upload(ct.files)
        keys_file = tmp / "api_keys.json"
        _, api_key = add_key(keys_file, "ohif-ws1", "annotator")
        conf = {
            "checkpoint": str(random_checkpoint),
            "model_config": str(small_config_file(tmp)),
            "window": "lung",
            "labels": json.dumps({"lesion": 1}, separators=(",", ":")),
            "api_keys_file": str(keys_file),
        }
        env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": idp.realm_uri}
        env["MONAI_LABEL_AUTH_CLIENT_ID"] = CLIENT_ID
        ready = bearer(idp.token(roles=ALL_ROLES))
        server = start_server(orthanc.dicomweb, conf, tmp / "server.log", env=env, ready_headers=ready)
        try:
            yield LoginSetup(orthanc, ct, server, api_key)
        finally:
            stop_server(server)
    finally:
        orthanc.stop()
        idp.stop()


def panel_ready(driver, setup: LoginSetup) -> None:
    """The study shown in the MedSAM2 mode, the panel connected to the server, the key slice shown."""
    from browser_testing import grey_std, jump_to_slice, screenshot, wait_for

    wait_for(lambda: driver.execute_script("return window.medsam2 && window.medsam2.state.info && 1"), 120, "panel")
    wait_for(lambda: driver.execute_script("return window.medsam2.bridge.active() && 1"), 90, "the series shown")
    wait_for(lambda: grey_std(screenshot(driver)[300:600, 500:1000]) > 20, 60, "the CT rendered")
    jump_to_slice(driver, KEY_SLICE)


def segs_of(setup: LoginSetup) -> list[dict]:
    study = setup.ct.study_uid
    return [x for x in setup.orthanc.series_of_modality("SEG") if x["0020000D"]["Value"][0] == study]


def test_the_viewer_asks_for_an_api_key_then_a_box_is_answered_and_saved_as_seg(setup):
    from browser_testing import chromium, click_panel, drag_voxels, panel_state, screenshot, wait_for

    with chromium(SHOTS / "chromedriver.log") as driver:
        driver.get(f"{setup.server.url}/ohif/medsam2?StudyInstanceUIDs={setup.ct.study_uid}")
        prompt = wait_for(lambda: driver.switch_to.alert, 90, "the viewer's API key prompt")
        assert "API key" in prompt.text, prompt.text
        prompt.send_keys(setup.api_key)
        prompt.accept()
        panel_ready(driver, setup)
        assert panel_state(driver, "apiKey") == setup.api_key
        for name in ("3d", "foreground", "tool-box"):
            click_panel(driver, name)
        wait_for(lambda: panel_state(driver, "tool") == "box", 5, "the box tool")
        x0, y0, x1, y1 = NODULE_BOX
        drag_voxels(driver, setup.ct.image, [(x0, y0), ((x0 + x1) / 2, (y0 + y1) / 2), (x1, y1)], KEY_SLICE)
        click_panel(driver, "run")
        wait_for(lambda: panel_state(driver, "lastRun") is not None and not panel_state(driver, "busy"), 300, "3D")
        assert panel_state(driver, "error") is None, panel_state(driver, "error")
        assert segs_of(setup) == []
        click_panel(driver, "save")
        saved = "Saved as the final label"
        wait_for(lambda: panel_state(driver, "status") == saved or panel_state(driver, "error"), 90, "the save")
        assert panel_state(driver, "error") is None, panel_state(driver, "error")
        screenshot(driver, SHOTS / "saved.png")
    assert len(wait_for(lambda: segs_of(setup), 60, "the SEG in Orthanc")) == 1
    assert setup.api_key not in setup.server.log.read_text()  # the key never reaches the log


def test_a_key_in_the_address_fragment_opens_the_study_without_a_prompt_and_leaves_the_address(setup):
    from browser_testing import chromium, panel_state

    fragment = f"#medsam2-api-key={setup.api_key}"
    with chromium(SHOTS / "chromedriver_fragment.log") as driver:
        driver.get(f"{setup.server.url}/ohif/medsam2?StudyInstanceUIDs={setup.ct.study_uid}{fragment}")
        panel_ready(driver, setup)
        assert setup.api_key not in driver.current_url
        assert panel_state(driver, "apiKey") == setup.api_key
        kept = driver.execute_script("return sessionStorage.getItem('medsam2.apiKey')")
        assert kept == setup.api_key  # kept for the tab: a reload still has it
