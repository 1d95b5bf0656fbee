"""Encode-ahead through the real server: Slicer's image download starts it, /info shows it, the answer says how
much was ready; requests go first; it stops when its image is evicted or the cache has no room; warm start."""

from __future__ import annotations

import time

import pytest
import torch
from test_server_2d import infer, split_multipart

from conftest import start_server, stop_server, write_image
from lib.engine.checkpoints import build_model, save_checkpoint
from lib.engine.precision import cpu_has_fast_bf16
from lib.server.image_opened import opened_image
from sam2_testing import blob_volume, object_present_bias, small_config_file

pytestmark = pytest.mark.server

GEOMETRY = dict(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode_ahead")
    config = small_config_file(root, 128)
    torch.manual_seed(0)
    checkpoint = root / "random_128.pt"
    save_checkpoint(object_present_bias(build_model(config)), checkpoint)
    studies = root / "studies"
    studies.mkdir()
    write_image(blob_volume((24, 48, 48), radius=10.0), studies / "short.nii.gz", **GEOMETRY)
    write_image(blob_volume((240, 64, 64), radius=14.0, seed=2), studies / "long.nii.gz", **GEOMETRY)
    conf = {"checkpoint": str(checkpoint), "model_config": str(config), "window": "abdomen", "warm_up": "on"}
    return root, studies, conf


def _start(setup, name: str, **extra: str):
    root, studies, conf = setup
    return start_server(studies, {**conf, **extra}, root / f"{name}.log")


def _ahead(server) -> dict:
    return server.get("/info/").json()["encode_ahead"]["medsam2"]


def _job(server, image: str, timeout: float = 120.0) -> dict:
    """The image's finished encode-ahead job (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [j for j in _ahead(server)["finished"] if j["image"] == image]
        if done:
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no finished encode-ahead job for {image}: {_ahead(server)}")


def test_viewer_paths_that_open_an_image():
    assert opened_image("/datastore/image", b"image=ct_1&check_only=false") == ("ct_1", "image download")
    assert opened_image("/datastore/image", b"image=ct_1&check_only=true") is None  # Slicer's cache check
    series = "/proxy/dicom/wado/studies/1.2.3/series/1.2.3.4.5/instances/1.9/frames/1"
    assert opened_image(series, b"") == ("1.2.3.4.5", "dicomweb")
    assert opened_image("/proxy/dicom/qido/studies/1.2.3/series", b"") is None
    assert opened_image("/datastore/label", b"label=ct_1") is None


def test_opened_image_is_encoded_before_the_click_and_requests_go_first(setup):
    server = _start(setup, "default", cpu_encoder="openvino")
    try:
        assert "image_opened" in server.get("/info/").json()["patches"]["applied"]
        deadline = time.monotonic() + 60
        while not server.get("/info/").json()["warm_up"].get("medsam2"):  # the model ran once at start
            assert time.monotonic() < deadline
            time.sleep(0.2)
        info = server.get("/info/").json()
        assert isinstance(info["warm_up"]["medsam2"], float)
        encoder = "openvino" if cpu_has_fast_bf16() else "sam2"  # OpenVINO only where the app runs bf16
        assert info["checkpoints"]["medsam2"]["engine"] == {"tracking": "cpu_inference", "image_encoder": encoder}
        assert server.get("/datastore/image", params={"image": "short", "check_only": "true"}).status_code == 200
        assert _ahead(server)["running"] is None and not _ahead(server)["finished"]  # a check opens nothing
        assert server.get("/datastore/image", params={"image": "short"}).status_code == 200  # Slicer opens it
        job = _job(server, "short")
        assert job["state"] == "done" and job["encoded"] == job["encoded_ahead"] == 24
        r = infer(server, "medsam2_3d", "short", {"label": "lesion", "foreground": [[24, 24, 12]], "client_id": "s"})
        assert r.status_code == 200, r.text
        _, result = split_multipart(r)
        assert result["session"]["ready_at_request"] == {"slices": 24, "needed": 24}
        assert result["session"]["encoded_ahead"] == 24 and result["latencies"]["encode"] < 0.5

        # a long image opens; a request on another image meanwhile makes the worker wait (then it finishes)
        assert server.get("/datastore/image", params={"image": "long"}).status_code == 200
        deadline = time.monotonic() + 60
        while (_ahead(server)["running"] or {}).get("encoded", 0) < 2:
            assert time.monotonic() < deadline, _ahead(server)
            time.sleep(0.05)
        r = infer(server, "medsam2_3d", "short", {"label": "organ", "foreground": [[20, 20, 5]], "client_id": "s"})
        assert r.status_code == 200, r.text
        assert _ahead(server)["waits_for_requests"] >= 1
        assert _job(server, "long")["state"] == "done" and _job(server, "long")["encoded"] == 240
        _, second = split_multipart(
            infer(server, "medsam2_2d", "long", {"label": "lesion", "foreground": [[30, 30, 100]], "client_id": "t"})
        )
        assert second["slice_encoded_before"] and second["session"]["encoded_ahead"] == 240
    finally:
        stop_server(server)


def test_stops_when_evicted_or_out_of_room_and_a_request_still_works(setup):
    server = _start(setup, "small_cache", max_sessions="1", max_session_gb="0.01")
    try:
        # 0.01 GiB holds the long image and part of its encoded slices: the worker stops at the cap
        assert server.get("/datastore/image", params={"image": "long"}).status_code == 200
        job = _job(server, "long")
        assert job["state"] == "cancelled" and "session cache is full" in job["reason"], job
        assert 0 < job["encoded"] < 240
        cache = server.get("/info/").json()["session_cache"]["medsam2"]
        assert cache["bytes"] <= cache["max_bytes"]
        # a request on another image evicts it (one image at a time); the evicted one is not encoded on
        r = infer(server, "medsam2_3d", "short", {"label": "lesion", "foreground": [[24, 24, 12]]})
        assert r.status_code == 200, r.text
        assert server.get("/info/").json()["session_cache"]["medsam2"]["evictions"] >= 1
        assert _ahead(server)["running"] is None
    finally:
        stop_server(server)
