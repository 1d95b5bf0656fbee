"""The production install used as a hospital's annotators would: ``scripts/install_server.py`` on a clean folder
with its images in a real Orthanc, login on, TLS (a self-signed certificate) and nginx in front, and OHIF's own
login (``--conf ohif_client_id``). In headless Chromium over https://localhost: OHIF sends the annotator to the
OpenID Connect provider's login form (authorization code with PKCE), comes back to the study with the provider's
token, a box on the lung nodule gives a 3D answer, and Save label puts a DICOM SEG in Orthanc.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_install_server import Installed, running_install
from test_ohif_login import OHIF_CLIENT, Pacs, box_answered_and_saved, open_study_after_ohif_login, pacs_with_login

from conftest import ARTIFACTS
from sam2_testing import small_config_file

pytestmark = [pytest.mark.server, pytest.mark.pacs, pytest.mark.browser]
SHOTS = ARTIFACTS / "install_ohif"


def trusting(cert: Path) -> str:
    """The Chromium flag that trusts exactly this certificate (the SHA-256 of its public key, base64)."""
    public_key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "--ignore-certificate-errors-spki-list=" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def installed_on_pacs(tmp_path_factory, random_checkpoint) -> Iterator[tuple[Installed, Pacs]]:
    root = tmp_path_factory.mktemp("install_ohif")
    with pacs_with_login(root, SHOTS) as pacs:
        app_conf = {
            "model_config": str(small_config_file(root)),
            "window": "lung",
            "ohif_client_id": OHIF_CLIENT,
        }
        checkpoint = str(random_checkpoint)
        # the panel saves a whole labelmap (an uncompressed NRRD of the series: 5 MB here)
        with running_install(root, pacs.idp, pacs.orthanc.dicomweb, checkpoint, app_conf, max_upload="64m") as ok:
            yield ok, pacs


def test_ohif_over_https_logs_in_at_the_provider_answers_a_box_and_saves_a_seg_in_orthanc(installed_on_pacs):
    from browser_testing import chromium

    installed, pacs = installed_on_pacs
    assert installed.url.startswith("https://")
    with chromium(SHOTS / "chromedriver.log", flags=[trusting(installed.cert)]) as driver:
        open_study_after_ohif_login(driver, pacs, installed.url)
        assert driver.execute_script("return window.isSecureContext && location.protocol") == "https:"
        box_answered_and_saved(driver, pacs, SHOTS / "saved.png")
