"""Sessions that free themselves (lib/engine/session_limits.py, lib/engine/image_sessions.py): a cap on live
annotation sessions answered with 429 + Retry-After, an idle timeout that drops sessions and the images no session
uses, and the heartbeat (POST /medsam2/heartbeat, docs/api.md) that keeps an open study's sessions."""

from __future__ import annotations

import time

import pytest
import SimpleITK as sitk

from lib.engine.preprocessing import parse_window
from lib.engine.prompts import LabelMap
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings
from lib.engine.session_limits import SessionLimits
from lib.engine.volume_session import SessionCache
from lib.errors import TooManySessions, Unprocessable
from lib.server.session_routes import read_heartbeat
from sam2_testing import FixedModelProvider, blob_volume, small_model

SHAPE = (8, 40, 48)
IDLE_S = 0.4


@pytest.fixture(scope="module")
def model():
    return small_model(seed=3)


@pytest.fixture()
def images(tmp_path) -> dict[str, str]:
    paths = {}
    for name in ("ct_one", "ct_two"):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(blob_volume(SHAPE, radius=7.0)), paths[name])
    return paths


def box(client: str) -> dict:
    return {"prompts": [{"label": "lesion", "slice": 4, "box": [10, 8, 36, 30]}], "client_id": client}


def segmenter(model, max_live: int, idle_s: float) -> MedSAM2Segmenter:
    settings = SegmenterSettings(window=parse_window("abdomen"), labels=LabelMap({"lesion": 1}))
    limits = SessionLimits(max_live=max_live, idle_s=idle_s)
    return MedSAM2Segmenter(FixedModelProvider(model), settings, SessionCache(4, 1 << 30), limits=limits)


def test_one_session_over_the_cap_is_a_429_with_retry_after_and_what_to_do(model, images):
    seg = segmenter(model, max_live=2, idle_s=600)
    seg.segment_2d(images["ct_one"], box("alice"))
    seg.segment_2d(images["ct_two"], box("bob"))
    seg.segment_2d(images["ct_one"], box("alice"))  # her own session again: no new one
    with pytest.raises(TooManySessions) as refused:
        seg.segment_2d(images["ct_one"], box("carol"))
    error = refused.value
    assert error.status == 429 and 590 <= int(error.headers["Retry-After"]) <= 600
    assert "max_live_sessions" in error.detail and "Retry" in error.detail
    assert len(seg.sessions) == 2
    with pytest.raises(TooManySessions):  # a heartbeat for an image without a session says so too
        seg.heartbeat("ct_three")
    assert seg.heartbeat("ct_one") == 1 and seg.heartbeat("ct_two", "bob") == 1


def test_idle_sessions_and_their_images_are_dropped_and_a_heartbeat_keeps_one(model, images):
    seg = segmenter(model, max_live=2, idle_s=IDLE_S)
    seg.segment_2d(images["ct_one"], box("alice"))
    seg.segment_2d(images["ct_two"], box("bob"))
    assert len(seg.cache) == 2
    time.sleep(IDLE_S + 0.1)
    assert seg.heartbeat("ct_one") == 1  # alice's viewer is still open
    assert seg.images.reap_idle() == 2  # bob's session, then his image
    assert len(seg.sessions) == 1 and len(seg.cache) == 1
    seg.segment_2d(images["ct_two"], box("carol"))  # room again
    time.sleep(IDLE_S + 0.1)
    seg.segment_2d(images["ct_two"], box("dave"))  # at the cap, the idle ones are dropped to make room
    assert len(seg.sessions) == 1


def test_no_cap_and_no_timeout_when_set_to_zero(model, images):
    seg = segmenter(model, max_live=0, idle_s=0)
    for client in ("a", "b", "c"):
        seg.segment_2d(images["ct_one"], box(client))
    assert len(seg.sessions) == 3 and seg.images.reap_idle() == 0 and seg.heartbeat("ct_one") == 3


def test_the_heartbeat_body_is_checked():
    assert read_heartbeat(b'{"image": "1.2.840.1"}') == ("1.2.840.1", None)
    assert read_heartbeat(b'{"image": "ct_one", "client_id": "ohif-7"}') == ("ct_one", "ohif-7")
    for body in (
        b"",
        b"[]",
        b'{"image": ""}',
        b'{"image": "../x"}',
        b'{"image": 7}',
        b'{"image": "a", "client_id": 1}',
    ):
        with pytest.raises(Unprocessable):
            read_heartbeat(body)
