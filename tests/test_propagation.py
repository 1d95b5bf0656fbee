"""Propagation engine: coverage, ranges, determinism, multi-label, axes, sessions and the cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lib.engine.preprocessing import parse_window, to_uint8
from lib.engine.prompts import KeySlicePrompt, LabelMap
from lib.engine.propagation import propagate_volume
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings
from lib.engine.volume_session import SessionCache, VolumeSession, frames_along_axis, frames_to_volume
from sam2_testing import FixedModelProvider, blob_volume, small_model


@pytest.fixture(scope="module")
def model():
    return small_model(seed=2)


@pytest.fixture(scope="module")
def frames():
    return to_uint8(blob_volume((12, 40, 48), radius=8.0, seed=3), parse_window("abdomen"))


def lesion(slice_index, box=(10.0, 8.0, 36.0, 30.0), label="lesion", value=1):
    return KeySlicePrompt(label, value, slice_index, box=box)


@pytest.mark.slow
def test_covers_exactly_the_requested_slices(model, frames):
    session = VolumeSession(frames, model)
    full = propagate_volume(session, [lesion(5)])
    assert sorted(full.logits["lesion"]) == list(range(12))
    part = propagate_volume(session, [lesion(5)], slice_range=(3, 8))
    assert sorted(part.logits["lesion"]) == list(range(3, 9))
    labels = part.label_frames()
    assert not labels[:3].any() and not labels[9:].any() and labels[3:9].any()
    assert session.slices_encoded == 12  # the second request encoded nothing new


@pytest.mark.slow
def test_deterministic(model, frames):
    a = propagate_volume(VolumeSession(frames, model), [lesion(4)]).label_frames()
    b = propagate_volume(VolumeSession(frames, model), [lesion(4)]).label_frames()
    assert np.array_equal(a, b)


def test_multilabel_one_pass_and_overlap_rule(model, frames):
    session = VolumeSession(frames, model)
    prompts = [lesion(6), lesion(6, box=(2.0, 2.0, 20.0, 20.0), label="organ", value=2)]
    result = propagate_volume(session, prompts)
    # both labels and both directions share batched steps: one step per slice distance, not per label
    assert result.steps == max(6, 11 - 6)
    out = result.label_frames()
    assert set(np.unique(out).tolist()) <= {0, 1, 2}
    m1, m2 = result.binary_mask("lesion"), result.binary_mask("organ")
    assert not ((out == 1) & ~m1).any() and not ((out == 2) & ~m2).any()  # a label only where its mask is
    assert ((out > 0) == (m1 | m2)).all()  # every voxel in any mask is labelled


@pytest.mark.slow
def test_several_key_slices_for_one_label(model, frames):
    session = VolumeSession(frames, model)
    result = propagate_volume(session, [lesion(3), lesion(8, box=(12.0, 10.0, 30.0, 28.0))])
    assert sorted(result.logits["lesion"]) == list(range(12))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_axes_round_trip(frames, axis):
    cut = frames_along_axis(frames, axis)
    assert np.array_equal(frames_to_volume(cut, axis), frames)


def test_session_cache_lru_and_byte_cap(model, frames):
    cache = SessionCache(max_sessions=2, max_bytes=10 << 30)
    made = []
    for key in ("a", "b", "c"):
        cache.get_or_create(key, lambda: made.append(1) or VolumeSession(frames, model))
    assert len(cache) == 2 and len(made) == 3
    _, created = cache.get_or_create("a", lambda: VolumeSession(frames, model))
    assert created  # "a" was evicted first
    small = SessionCache(max_sessions=10, max_bytes=frames.nbytes * 2 + 10)
    for key in range(5):
        small.get_or_create(key, lambda: VolumeSession(frames, model))
    assert small.total_bytes() <= frames.nbytes * 2 + 10


def test_segmenter_sessions_are_isolated_between_users_and_images(model, frames, tmp_path):
    import SimpleITK as sitk

    for name in ("one", "two"):
        sitk.WriteImage(
            sitk.GetImageFromArray(blob_volume((12, 40, 48), radius=8.0, seed=3)), str(tmp_path / f"{name}.nii.gz")
        )
    settings = SegmenterSettings(parse_window("abdomen"), LabelMap({"lesion": 1, "organ": 2}))
    seg = MedSAM2Segmenter(FixedModelProvider(model), settings, SessionCache(8))
    one, two = str(tmp_path / "one.nii.gz"), str(tmp_path / "two.nii.gz")
    req_a = {"client_id": "alice", "label": "lesion", "roi": [8, 36, 8, 30, 5, 5]}
    alone, res_alone, _ = seg.segment_3d(one, dict(req_a))
    # bob adds a second label on the same image: alice's state must not change
    seg.segment_3d(one, {"client_id": "bob", "label": "organ", "roi": [2, 20, 2, 20, 5, 5]})
    again, res_again, _ = seg.segment_3d(one, dict(req_a))
    assert np.array_equal(alone, again) and res_again["session"]["reused"]
    assert [p["label"] for p in res_again["prompts_in_session"]] == ["lesion"]
    # alice adds a label: only that label is propagated, the other's answer is kept; nothing is re-encoded
    both, res_both, _ = seg.segment_3d(one, {"client_id": "alice", "label": "organ", "roi": [2, 20, 2, 20, 5, 5]})
    assert (
        set(np.unique(both).tolist()) <= {0, 1, 2}
        and res_both["latencies"]["encode"] < res_alone["latencies"]["encode"]
    )
    assert sorted(res_both["coverage"]) == ["lesion", "organ"]
    assert res_both["session"]["labels_recomputed"] == ["organ"]
    both_at_once = {
        "client_id": "carol",
        "prompts": [
            {"label": "lesion", "slice": 5, "box": [8, 8, 36, 30]},
            {"label": "organ", "slice": 5, "box": [2, 2, 20, 20]},
        ],
        "slice_range": [5, 5],
    }
    fresh, res_fresh, _ = seg.segment_3d(one, both_at_once)  # the same prompts, both labels propagated together
    assert res_fresh["session"]["labels_recomputed"] == ["lesion", "organ"]
    assert np.mean(fresh == both) > 0.999
    # reset_state starts over
    reset, res_reset, _ = seg.segment_3d(one, dict(req_a, reset_state=True))
    assert [p["label"] for p in res_reset["prompts_in_session"]] == ["lesion"] and np.array_equal(reset, alone)
    # another image: separate session
    _, res_two, _ = seg.segment_3d(two, dict(req_a))
    assert not res_two["session"]["reused"]

    # concurrent requests on one session are serialised and give the same answer
    outs = []
    threads = [
        threading.Thread(target=lambda: outs.append(seg.segment_3d(one, dict(req_a, reset_state=True))[0]))
        for _ in range(3)
    ]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(np.array_equal(o, alone) for o in outs)


def test_volume_over_the_size_limit_is_refused_before_loading(tmp_path):
    import SimpleITK as sitk

    from lib.errors import ImageUnreadable
    from lib.imaging.volume_io import load_image

    path = tmp_path / "big.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 40, 50), np.int16)), str(path))
    with pytest.raises(ImageUnreadable) as err:
        load_image(path, max_voxels=10_000)
    assert err.value.status == 413 and "max_voxels" in str(err.value)
    assert load_image(path, max_voxels=60_000).array.shape == (30, 40, 50)


def test_label_frames_skips_empty_slices_without_changing_the_answer():
    import torch

    from lib.engine.propagation import PropagationResult, compose_labels, upsample_logits

    gen = torch.Generator().manual_seed(0)
    logits = {
        name: {f: torch.randn(8, 8, generator=gen) - (0 if f in keep else 9) for f in range(6)}
        for name, keep in (("lesion", {1, 2}), ("organ", {2, 4}))
    }
    result = PropagationResult(logits, {}, {}, {"lesion": 1, "organ": 2}, {}, {}, rows=20, cols=24, num_slices=7)
    stacked = torch.stack([torch.stack([logits[n][f] for f in range(6)]) for n in ("lesion", "organ")], dim=1)
    every_slice = compose_labels(stacked, [1, 2], 20, 24)
    out = result.label_frames(chunk=2)
    assert np.array_equal(out[:6], every_slice) and not out[6].any()
    assert out[1].any() and out[4].any() and not out[0].any()
    organ = upsample_logits(torch.stack([logits["organ"][f] for f in range(6)]).unsqueeze(1), 20, 24) > 0
    assert np.array_equal(result.binary_mask("organ", chunk=2)[:6], organ.numpy())
