"""Encode-ahead in the engine (lib/engine/encode_ahead.py): order, partial use, priority, cancellation, memory bound.

The same behaviour through the real server (Slicer's image download, /info, the answer's JSON) is in
tests/test_server_encode_ahead.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lib.engine.encode_ahead import EncodeAhead, center_out
from lib.engine.preprocessing import parse_window
from lib.engine.prompts import LabelMap
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings
from lib.engine.volume_session import SessionCache
from sam2_testing import FixedModelProvider, blob_volume, small_model


@pytest.fixture(scope="module")
def model():
    return small_model(seed=4)


def _study(folder, name: str, slices: int) -> str:
    import SimpleITK as sitk

    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(blob_volume((slices, 40, 48), radius=8.0, seed=5)), str(path))
    return str(path)


def _segmenter(model, max_sessions: int = 4, max_bytes: int = 1 << 30) -> MedSAM2Segmenter:
    settings = SegmenterSettings(parse_window("abdomen"), LabelMap({"lesion": 1}), encode_batch=2)
    cache = SessionCache(max_sessions=max_sessions, max_bytes=max_bytes)
    return MedSAM2Segmenter(FixedModelProvider(model), settings, cache, encode_ahead=True)


def _wait(condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _finished(seg: MedSAM2Segmenter, name: str) -> dict | None:
    return next((j for j in seg.ahead.status()["finished"] if j["image"] == name), None)


def test_center_out_covers_every_slice_once_from_the_middle():
    assert center_out(5) == [2, 3, 1, 4, 0]
    assert center_out(6) == [2, 3, 1, 4, 0, 5]
    assert sorted(center_out(61)) == list(range(61)) and center_out(1) == [0]


def test_an_opened_image_is_encoded_and_a_request_then_encodes_nothing(model, tmp_path):
    seg = _segmenter(model)
    path = _study(tmp_path, "a", 10)
    assert seg.open_ahead("a", "image download", lambda: path)
    assert not seg.open_ahead("a", "image download", lambda: path)  # already queued or running
    _wait(lambda: _finished(seg, "a") is not None)
    job = _finished(seg, "a")
    assert job["state"] == "done" and job["encoded"] == job["encoded_ahead"] == 10
    assert not seg.open_ahead("a", "dicomweb", lambda: path)  # done and still cached
    label, out, _ = seg.segment_3d(path, {"label": "lesion", "foreground": [[20, 18, 5]], "client_id": "x"})
    assert out["session"]["ready_at_request"] == {"slices": 10, "needed": 10}
    assert out["session"]["encoded_ahead"] == 10 and out["session"]["slices_encoded_total"] == 10
    # the same encoded slices serve a 2D request of another annotator
    _, out2d, _ = seg.segment_2d(path, {"label": "lesion", "slice": 3, "roi": [8, 36, 8, 30, 3, 3], "client_id": "y"})
    assert out2d["slice_encoded_before"] and out2d["session"]["slices_encoded_total"] == 10
    assert label.shape == (10, 40, 48)


def test_a_request_mid_way_uses_the_encoded_slices_and_encodes_the_rest(model, tmp_path):
    seg = _segmenter(model)
    path = _study(tmp_path, "b", 40)
    with seg.foreground():  # an annotator's request is running: nothing starts
        seg.open_ahead("b", "image download", lambda: path)
        time.sleep(0.5)
        assert seg.ahead.status()["running"]["encoded"] == 0
    _wait(lambda: (seg.ahead.status()["running"] or {}).get("encoded", 0) >= 4)
    with seg.foreground():  # the worker finishes its chunk in flight, then waits
        time.sleep(0.3)
        _, out, _ = seg.segment_3d(path, {"label": "lesion", "foreground": [[20, 18, 20]]})
    ready = out["session"]["ready_at_request"]
    assert ready["needed"] == 40 and 4 <= ready["slices"] < 40, ready
    assert out["session"]["slices_encoded_total"] == 40  # the request encoded the rest
    assert seg.ahead.status()["waits_for_requests"] >= 1
    _wait(lambda: _finished(seg, "b") is not None)
    assert _finished(seg, "b")["state"] == "done"


def test_the_worker_waits_while_requests_run(model, tmp_path):
    seg = _segmenter(model)
    path = _study(tmp_path, "c", 30)
    with seg.foreground():
        seg.open_ahead("c", "image download", lambda: path)
        time.sleep(1.0)
        running = seg.ahead.status()["running"]
        assert running is not None and running["encoded"] == 0  # not one slice while a request runs
    _wait(lambda: _finished(seg, "c") is not None)
    assert _finished(seg, "c")["encoded"] == 30


def test_a_newer_image_takes_over_and_the_older_one_resumes_after_it(model, tmp_path):
    seg = _segmenter(model)
    older, newer = _study(tmp_path, "older", 60), _study(tmp_path, "newer", 8)
    seg.open_ahead("older", "image download", lambda: older)
    _wait(lambda: (seg.ahead.status()["running"] or {}).get("encoded", 0) >= 2)
    seg.open_ahead("newer", "image download", lambda: newer)  # the annotator opened another image
    _wait(lambda: _finished(seg, "newer") is not None)
    assert _finished(seg, "older") is None  # paused, not finished: the newer image went first
    _wait(lambda: _finished(seg, "older") is not None)
    finished = seg.ahead.status()["finished"]
    assert [j["image"] for j in finished] == ["older", "newer"]  # newest first
    assert all(j["state"] == "done" for j in finished) and finished[0]["encoded"] == 60


def test_cancelled_when_its_image_leaves_the_cache(model, tmp_path):
    seg = _segmenter(model, max_sessions=1)
    big, other = _study(tmp_path, "big", 60), _study(tmp_path, "other", 6)
    seg.open_ahead("big", "image download", lambda: big)
    _wait(lambda: (seg.ahead.status()["running"] or {}).get("encoded", 0) >= 2)
    seg.segment_2d(other, {"label": "lesion", "slice": 2, "roi": [8, 36, 8, 30, 2, 2]})  # evicts "big"
    _wait(lambda: _finished(seg, "big") is not None)
    job = _finished(seg, "big")
    assert job["state"] == "cancelled" and "left the session cache" in job["reason"] and job["encoded"] < 60


def test_bounded_by_the_session_cache(model, tmp_path):
    path = _study(tmp_path, "d", 40)
    probe = _segmenter(model)
    probe.open_ahead("d", "image download", lambda: path)
    _wait(lambda: _finished(probe, "d") is not None)
    full = probe.cache.total_bytes()
    seg = _segmenter(model, max_bytes=full // 2)  # room for about half of the encoded slices
    seg.open_ahead("d", "image download", lambda: path)
    _wait(lambda: _finished(seg, "d") is not None)
    job = _finished(seg, "d")
    assert job["state"] == "cancelled" and "session cache is full" in job["reason"]
    assert 0 < job["encoded"] < 40 and seg.cache.total_bytes() <= full // 2


def test_newer_images_push_older_queued_ones_out_and_failures_are_reported(model, tmp_path):
    gate = threading.Event()
    ahead = EncodeAhead(lambda prepared, nbytes: None, chunk=1, max_queued=2)

    def blocked():
        gate.wait(30)
        raise FileNotFoundError("no such image")

    ahead.submit("first", "test", blocked)  # runs (and blocks) first
    _wait(lambda: ahead.status()["running"] is not None)
    for name in ("q1", "q2", "q3"):
        ahead.submit(name, "test", blocked)
    status = ahead.status()
    assert status["queued"] == ["q2", "q3"]
    assert status["finished"][0] == {
        "image": "q1",
        "source": "test",
        "state": "cancelled",
        "slices": 0,
        "encoded": 0,
        "encoded_ahead": 0,
        "seconds": 0.0,
        "reason": "newer images were opened",
    }
    gate.set()
    _wait(lambda: not ahead.status()["queued"] and ahead.status()["running"] is None)
    failed = {j["image"]: j for j in ahead.status()["finished"]}
    assert failed["first"]["state"] == "failed" and "no such image" in failed["first"]["reason"]
    assert [j["image"] for j in ahead.status()["finished"]][:2] == ["q2", "q3"]  # newest opened first
    ahead.stop()
    assert np.isfinite(ahead.status()["slices_encoded"])
