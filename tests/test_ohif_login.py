"""The OHIF panel in front of a server with login on (docs/security.md#clients), in headless Chromium on a real
Orthanc: OHIF has no login of its own, so the viewer asks for an API key at start, before its study list asks
the server's DICOMweb proxy; with the key, the study opens, a box gives a 3D answer and the save becomes a DICOM
SEG in Orthanc. The key given in the address's fragment instead opens the study without a prompt and leaves the
address bar. With ``--conf ohif_client_id`` (a second server), OHIF logs its user in itself at the identity provider
(its login form, the authorization code with PKCE) and its token alone opens the study, answers and saves. The
identity provider is tests/test_auth.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pacs_testing import CHROMEDRIVER, CHROMIUM, CtSeries, Orthanc, lung_ct, require, write_ct_series
from test_auth import ALL_ROLES, CLIENT_ID, PASSWORDS, LocalIdentityProvider, bearer

from conftest import ARTIFACTS, Server, start_server, stop_server
from lib.server.api_keys import add_key
from sam2_testing import small_config_file

pytestmark = [pytest.mark.server, pytest.mark.pacs, pytest.mark.browser]
SHOTS = ARTIFACTS / "ohif_login"
KEY_SLICE = 10
NODULE_BOX = (157, 164, 204, 202)  # the lung2 nodule in the slab (tests/test_ohif_panel.py)
OHIF_CLIENT = "ohif-viewer"  # OHIF's own public client at the provider


@dataclass
class Pacs:
    idp: LocalIdentityProvider
    orthanc: Orthanc
    ct: CtSeries


@dataclass
class LoginSetup:
    pacs: Pacs
    server: Server
    api_key: str


@contextmanager
def pacs_with_login(folder: Path, shots: Path) -> Iterator[Pacs]:
    """An identity provider and the lung CT slab in a real Orthanc (Chromium must be there: the tests use it)."""
    require([CHROMIUM, CHROMEDRIVER], "Chromium and chromedriver (Debian chromium, chromium-driver)")
    shots.mkdir(parents=True, exist_ok=True)
    idp = LocalIdentityProvider()
    orthanc = Orthanc(folder / "orthanc").start()
    try:
        ct = write_ct_series(lung_ct(first_slice=KEY_SLICE), folder / "ct")
        orthanc.upload(ct.files)
        yield Pacs(idp, orthanc, ct)
    finally:
        orthanc.stop()
        idp.stop()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[Pacs]:
    """For both servers of this file."""
    with pacs_with_login(tmp_path_factory.mktemp("ohif_login_pacs"), SHOTS) as pacs:
        yield pacs


def login_server(pacs: Pacs, tmp: Path, checkpoint: Path, **conf: str) -> tuple[Server, str]:
    """The server on the PACS with login on and an API key file holding an annotator's key (returned)."""
    keys_file = tmp / "api_keys.json"
    _, api_key = add_key(keys_file, "ohif-ws1", "annotator")
    conf = {
        "checkpoint": str(checkpoint),
        "model_config": str(small_config_file(tmp)),
        "window": "lung",
        "labels": json.dumps({"lesion": 1}, separators=(",", ":")),
        "api_keys_file": str(keys_file),
        **conf,
    }
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": pacs.idp.realm_uri}
    env["MONAI_LABEL_AUTH_CLIENT_ID"] = CLIENT_ID
    ready = bearer(pacs.idp.token(roles=ALL_ROLES))
    return start_server(pacs.orthanc.dicomweb, conf, tmp / "server.log", env=env, ready_headers=ready), api_key


@pytest.fixture(scope="module")
def setup(pacs, tmp_path_factory, random_checkpoint) -> Iterator[LoginSetup]:
    """OHIF without a login of its own: the viewer asks for an API key."""
    server, api_key = login_server(pacs, tmp_path_factory.mktemp("ohif_login"), random_checkpoint)
    try:
        yield LoginSetup(pacs, server, api_key)
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def oidc_setup(pacs, tmp_path_factory, random_checkpoint) -> Iterator[LoginSetup]:
    """OHIF with its own login (``--conf ohif_client_id``) at the same provider."""
    tmp = tmp_path_factory.mktemp("ohif_oidc")
    server, api_key = login_server(pacs, tmp, random_checkpoint, ohif_client_id=OHIF_CLIENT)
    try:
        yield LoginSetup(pacs, server, api_key)
    finally:
        stop_server(server)


def panel_ready(driver) -> None:
    """The study shown in the MedSAM2 mode, the panel connected to the server, the key slice shown."""
    from browser_testing import grey_std, jump_to_slice, screenshot, wait_for

    wait_for(lambda: driver.execute_script("return window.medsam2 && window.medsam2.state.info && 1"), 120, "panel")
    wait_for(lambda: driver.execute_script("return window.medsam2.bridge.active() && 1"), 90, "the series shown")
    wait_for(lambda: grey_std(screenshot(driver)[300:600, 500:1000]) > 20, 60, "the CT rendered")
    jump_to_slice(driver, KEY_SLICE)


def segs_of(pacs: Pacs) -> list[dict]:
    study = pacs.ct.study_uid
    return [x for x in pacs.orthanc.series_of_modality("SEG") if x["0020000D"]["Value"][0] == study]


def test_the_viewer_asks_for_an_api_key_then_a_box_is_answered_and_saved_as_seg(setup):
    from browser_testing import chromium, panel_state, wait_for

    with chromium(SHOTS / "chromedriver.log") as driver:
        driver.get(f"{setup.server.url}/ohif/medsam2?StudyInstanceUIDs={setup.pacs.ct.study_uid}")
        prompt = wait_for(lambda: driver.switch_to.alert, 90, "the viewer's API key prompt")
        assert "API key" in prompt.text, prompt.text
        prompt.send_keys(setup.api_key)
        prompt.accept()
        panel_ready(driver)
        assert panel_state(driver, "apiKey") == setup.api_key
        assert segs_of(setup.pacs) == []
        box_answered_and_saved(driver, setup.pacs, SHOTS / "saved.png")
    assert setup.api_key not in setup.server.log.read_text()  # the key never reaches the log


def box_answered_and_saved(driver, pacs: Pacs, shot: Path) -> None:
    """A box on the nodule in 3D, its answer (nothing saved by it), then Save label: one more SEG in Orthanc."""
    from browser_testing import click_panel, drag_voxels, panel_state, screenshot, wait_for

    for name in ("3d", "foreground", "tool-box"):
        click_panel(driver, name)
    wait_for(lambda: panel_state(driver, "tool") == "box", 5, "the box tool")
    x0, y0, x1, y1 = NODULE_BOX
    drag_voxels(driver, pacs.ct.image, [(x0, y0), ((x0 + x1) / 2, (y0 + y1) / 2), (x1, y1)], KEY_SLICE)
    click_panel(driver, "run")
    wait_for(lambda: panel_state(driver, "lastRun") is not None and not panel_state(driver, "busy"), 300, "3D")
    assert panel_state(driver, "error") is None, panel_state(driver, "error")
    before = len(segs_of(pacs))
    click_panel(driver, "save")
    saved = "Saved as the final label"
    wait_for(lambda: panel_state(driver, "status") == saved or panel_state(driver, "error"), 90, "the save")
    assert panel_state(driver, "error") is None, panel_state(driver, "error")
    screenshot(driver, shot)
    wait_for(lambda: len(segs_of(pacs)) == before + 1, 60, "the SEG in Orthanc")


def test_a_key_in_the_address_fragment_opens_the_study_without_a_prompt_and_leaves_the_address(setup):
    from browser_testing import chromium, panel_state

    fragment = f"#medsam2-api-key={setup.api_key}"
    with chromium(SHOTS / "chromedriver_fragment.log") as driver:
        driver.get(f"{setup.server.url}/ohif/medsam2?StudyInstanceUIDs={setup.pacs.ct.study_uid}{fragment}")
        panel_ready(driver)
        assert setup.api_key not in driver.current_url
        assert panel_state(driver, "apiKey") == setup.api_key
        kept = driver.execute_script("return sessionStorage.getItem('medsam2.apiKey')")
        assert kept == setup.api_key  # kept for the tab: a reload still has it


def test_ohifs_own_login_at_the_provider_then_its_token_opens_the_study_answers_and_saves(oidc_setup):
    """OHIF's login (authorization code with PKCE at the provider's login form), then OHIF's token on every
    request to the DICOMweb proxy and the app: no API key anywhere."""
    from browser_testing import chromium

    with chromium(SHOTS / "chromedriver_oidc.log") as driver:
        open_study_after_ohif_login(driver, oidc_setup.pacs, oidc_setup.server.url)
        box_answered_and_saved(driver, oidc_setup.pacs, SHOTS / "saved_oidc.png")


def open_study_after_ohif_login(driver, pacs: Pacs, server_url: str) -> None:
    """Open the study: OHIF sends the browser to the provider's login form; alice logs in; OHIF takes the code
    (with its PKCE verifier) to the provider for a token, and is back on the study with the panel connected."""
    from browser_testing import panel_state, wait_for
    from selenium.webdriver.common.by import By

    grants_before = len(pacs.idp.grants)
    study = f"{server_url}/ohif/medsam2?StudyInstanceUIDs={pacs.ct.study_uid}"
    driver.get(study)
    try:
        wait_for(lambda: driver.find_elements(By.ID, "password") or None, 90, "the provider's login form")
    except AssertionError as e:
        console = [entry["message"] for entry in driver.get_log("browser")][-10:]
        raise AssertionError(f"{e}; at {driver.current_url}; console: {console}") from None
    assert driver.current_url.startswith(pacs.idp.realm_uri + "/protocol/openid-connect/auth?")
    driver.find_element(By.ID, "username").send_keys("alice")
    driver.find_element(By.ID, "password").send_keys(PASSWORDS["alice"])
    driver.find_element(By.ID, "login").click()
    panel_ready(driver)  # back from /ohif/callback to the study
    assert driver.current_url.startswith(study) and panel_state(driver, "apiKey") == ""
    grants = [g for g in pacs.idp.grants[grants_before:] if g.get("grant_type") == "authorization_code"]
    assert len(grants) == 1 and grants[0]["client_id"] == OHIF_CLIENT and grants[0]["code_verifier"], grants
