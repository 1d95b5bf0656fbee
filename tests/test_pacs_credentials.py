"""PACS credentials beyond basic auth (lib/storage/pacs_datastore.py): a bearer token from a file (re-read when it
changes) or the MEDSAM2_PACS_TOKEN variable, sent by the DICOMweb client the datastore uses; and the Google Healthcare
API path, which goes to MONAI Label's own datastore (dicomweb-client[gcp] credentials).

The client-level tests use a small DICOMweb stand-in on 127.0.0.1 that accepts one bearer token; the server test
runs a real Orthanc that answers only requests with the token (its own HTTP request filter, through Debian's
orthanc-python plugin)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import requests
from monailabel.datastore.dicom import DICOMwebClientX
from pacs_testing import TokenOrthanc, lung_ct, write_ct_series

from conftest import start_server, stop_server
from lib.errors import PacsUnavailable
from lib.storage.datastores import make_datastore
from lib.storage.pacs_datastore import PACS_TOKEN_ENV, BearerToken, TimeoutSession, pacs_credentials
from sam2_testing import small_config_file

NO_BASIC = SimpleNamespace(
    MONAI_LABEL_DATASTORE_USERNAME="", MONAI_LABEL_DATASTORE_PASSWORD="",
    MONAI_LABEL_DICOMWEB_USERNAME="", MONAI_LABEL_DICOMWEB_PASSWORD="",
)  # fmt: skip


@pytest.fixture()
def pacs():
    """QIDO-RS ``/dicom-web/series`` answering ``[]`` to ``Authorization: Bearer <pacs.token>``, else 401."""
    state = SimpleNamespace(token="token-1", seen=[])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            state.seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == f"Bearer {state.token}"
            body = json.dumps([] if ok else {"error": "token"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/dicom+json" if ok else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    yield state
    httpd.shutdown()
    httpd.server_close()


def client(url: str, auth) -> DICOMwebClientX:
    return DICOMwebClientX(url=url, session=TimeoutSession(5, auth))


def test_a_token_file_is_sent_and_a_renewed_token_used_without_a_restart(pacs, tmp_path):
    token_file = tmp_path / "pacs.token"
    token_file.write_text("token-1\n")
    dicomweb = client(pacs.url, pacs_credentials(NO_BASIC, str(token_file)))
    assert dicomweb.search_for_series() == [] and pacs.seen[-1] == "Bearer token-1"
    pacs.token = "token-2"  # the PACS rotates; a job writes the new token
    with pytest.raises(requests.HTTPError):
        dicomweb.search_for_series()
    token_file.write_text("token-2")
    assert dicomweb.search_for_series() == [] and pacs.seen[-1] == "Bearer token-2"


def test_the_token_can_come_from_the_environment_and_basic_auth_stays(pacs, monkeypatch):
    monkeypatch.setenv(PACS_TOKEN_ENV, "token-1")
    assert client(pacs.url, pacs_credentials(NO_BASIC)).search_for_series() == []
    monkeypatch.delenv(PACS_TOKEN_ENV)
    basic = SimpleNamespace(
        **{**vars(NO_BASIC), "MONAI_LABEL_DATASTORE_USERNAME": "u", "MONAI_LABEL_DATASTORE_PASSWORD": "p"}
    )
    assert pacs_credentials(basic) == ("u", "p") and pacs_credentials(NO_BASIC) is None


def test_a_missing_or_empty_token_file_is_a_503_naming_it(tmp_path):
    for path in (tmp_path / "absent.token", tmp_path / "empty.token"):
        if path.name == "empty.token":
            path.write_text("\n")
        with pytest.raises(PacsUnavailable, match="pacs_token_file") as refused:
            BearerToken(token_file=str(path)).token()
        assert str(path) in refused.value.detail and refused.value.status == 503


def test_the_google_healthcare_api_goes_to_monailabels_own_datastore():
    """dicomweb-client[gcp] authenticates it with Google's application default credentials (docs/pacs.md)."""
    own = object()
    url = "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb"
    assert make_datastore(url, {"lesion": 1}, 5.0, 0, lambda: own) is own


def test_a_real_orthanc_that_takes_only_a_bearer_token(tmp_path, random_checkpoint):
    """Orthanc refusing every request without the token (its own request filter): the server lists the series,
    answers on it, serves it to OHIF through the proxy and saves a SEG there with the token from the file; the PACS
    and the file rotate to a new token and the next requests use it, without a restart."""
    orthanc_token, server_token = tmp_path / "orthanc.token", tmp_path / "pacs.token"
    orthanc_token.write_text("token-1")
    server_token.write_text("token-1\n")
    orthanc = TokenOrthanc(tmp_path / "orthanc", orthanc_token).start()
    try:
        ct = write_ct_series(lung_ct(num_slices=8), tmp_path / "ct")
        orthanc.upload(ct.files)
        assert requests.get(orthanc.dicomweb + "/series", timeout=30).status_code == 403  # no token, no answer
        conf = {
            "checkpoint": str(random_checkpoint),
            "model_config": str(small_config_file(tmp_path)),
            "window": "lung",
            "pacs_token_file": str(server_token),
        }
        server = start_server(orthanc.dicomweb, conf, tmp_path / "server.log")
        try:
            with_token_in_use(server, orthanc, ct, tmp_path, saved_before=0)
            orthanc_token.write_text("token-2")  # the PACS rotates its token, a job writes it for the server
            orthanc.use_token()
            stale = server.get(f"/proxy/dicom/qido/studies/{ct.study_uid}/series")  # the server's token is old
            assert stale.status_code == 502 and "pacs_token_file" in stale.json()["detail"], stale.text[:300]
            server_token.write_text("token-2\n")
            with_token_in_use(server, orthanc, ct, tmp_path, saved_before=1)
        finally:
            stop_server(server)
    finally:
        orthanc.stop()


def with_token_in_use(server, orthanc, ct, tmp_path, saved_before: int) -> None:
    from test_pacs import LABEL_INFO, save_final
    from test_server_2d import split_multipart

    assert ct.series_uid in server.get("/datastore/?output=all").json()["objects"]
    answer = server.post(
        f"/infer/medsam2_3d?image={ct.series_uid}",
        data={"params": json.dumps({"label": "lesion", "foreground": [[120, 128, 4]], "client_id": "token"})},
    )
    assert answer.status_code == 200, answer.text[:300]
    label, _ = split_multipart(answer)
    proxied = server.get(f"/proxy/dicom/qido/studies/{ct.study_uid}/series")
    assert proxied.status_code == 200 and ct.series_uid in proxied.text, proxied.text[:300]
    saved = save_final(server, ct.series_uid, label, tmp_path, LABEL_INFO[:1])
    assert saved.status_code == 200, saved.text[:300]
    assert len(orthanc.series_of_modality("SEG")) == saved_before + 1
