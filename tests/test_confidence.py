"""Annotator guidance: per-slice confidence, slices to check, the stop rule, and corrections in a session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.engine.confidence import check_hint, neighbour_overlap, slice_confidence, slices_to_check
from lib.engine.preprocessing import parse_window, to_uint8
from lib.engine.prompts import KeySlicePrompt, LabelMap, parse_stop_options
from lib.engine.propagation import PropagationResult, StopRule, propagate_volume
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings
from lib.engine.volume_session import SessionCache, VolumeSession
from lib.errors import PromptError
from sam2_testing import FixedModelProvider, blob_volume, small_model


@pytest.fixture(scope="module")
def model():
    return small_model(seed=4)


@pytest.fixture(scope="module")
def frames():
    return to_uint8(blob_volume((14, 40, 48), radius=8.0, seed=5), parse_window("abdomen"))


def box_prompt(slice_index: int, label: str = "lesion", value: int = 1) -> KeySlicePrompt:
    return KeySlicePrompt(label, value, slice_index, box=(10.0, 8.0, 36.0, 30.0))


def test_propagation_returns_per_slice_iou_and_confidence(model, frames):
    result = propagate_volume(VolumeSession(frames, model), [box_prompt(6)])
    assert sorted(result.predicted_iou["lesion"]) == sorted(result.object_scores["lesion"]) == list(range(14))
    conf = slice_confidence(result)["lesion"]
    assert sorted(conf) == list(range(14)) and all(0.0 <= c <= 1.0 for c in conf.values())
    picks = slices_to_check(result, count=3)["lesion"]
    assert 1 <= len(picks) <= 3 and all(p.slice != 6 for p in picks)  # never the slice the user drew on
    assert all(abs(a.slice - b.slice) >= 3 for a in picks for b in picks if a is not b)
    assert "lesion: slices" in check_hint({"lesion": picks})


def _result(masks: dict[int, np.ndarray], scores: dict[int, float], ious: dict[int, float]) -> PropagationResult:
    logits = {f: torch.where(torch.from_numpy(m), 5.0, -5.0).half() for f, m in masks.items()}
    return PropagationResult(
        logits={"organ": logits},
        object_scores={"organ": scores},
        predicted_iou={"organ": ious},
        label_values={"organ": 2},
        key_slices={"organ": [2]},
        stopped={"organ": {}},
        rows=16,
        cols=16,
        num_slices=10,
    )


def test_slices_to_check_ranks_a_sharp_change_and_low_confidence():
    square = np.zeros((16, 16), bool)
    square[4:12, 4:12] = True
    shifted = np.zeros((16, 16), bool)
    shifted[0:4, 0:16] = True  # no overlap with the square
    masks = {f: square for f in range(10)}
    masks[7] = shifted
    scores = {f: 8.0 for f in range(10)}
    ious = {f: 0.95 for f in range(10)}
    ious[4] = 0.3  # SAM2 doubts its mask here
    result = _result(masks, scores, ious)
    assert neighbour_overlap(result)["organ"][7] == 0.0 and neighbour_overlap(result)["organ"][3] == 1.0
    conf = slice_confidence(result)
    assert conf["organ"][4] == pytest.approx(0.3, abs=0.01) and conf["organ"][5] == pytest.approx(0.95, abs=0.01)
    picks = slices_to_check(result, conf, count=2)["organ"]
    assert [p.slice for p in picks] == [7, 4]
    assert "changes sharply from slice 6" in picks[0].reason and "low confidence" in picks[1].reason


def test_stop_rule_ends_passes_and_leaves_the_rest_empty(model, frames):
    session = VolumeSession(frames, model)
    full = propagate_volume(session, [box_prompt(6)])
    # every object score of this model is far below 100: both passes end `patience` slices past the key slice
    stopped = propagate_volume(session, [box_prompt(6)], stop_rule=StopRule(min_object_score=100.0, patience=2))
    assert sorted(stopped.logits["lesion"]) == [6]
    assert stopped.stopped["lesion"] == {"forward": 7, "backward": 5}
    assert stopped.coverage()["lesion"]["stopped_at"] == {"forward": 7, "backward": 5}
    assert stopped.steps < full.steps
    labels = stopped.label_frames()
    assert not labels[:6].any() and not labels[7:].any()
    # a rule that never fires changes nothing
    never = propagate_volume(session, [box_prompt(6)], stop_rule=StopRule(min_object_score=-100.0, patience=2))
    for f, logits in full.logits["lesion"].items():
        assert torch.equal(never.logits["lesion"][f], logits)


def test_stop_rule_never_cuts_between_key_slices(model, frames):
    session = VolumeSession(frames, model)
    rule = StopRule(min_object_score=100.0, patience=1)
    result = propagate_volume(session, [box_prompt(3), box_prompt(9)], stop_rule=rule)
    # between the key slices both passes run; past them each pass ends after one low slice
    assert sorted(result.logits["lesion"]) == list(range(3, 10))
    assert result.stopped["lesion"] == {"forward": 10, "backward": 2}


def test_stop_options_are_validated():
    assert parse_stop_options({"stop_rule": "on", "stop_patience": "4"}).patience == 4
    assert parse_stop_options({}).enabled is None
    for bad in ({"stop_rule": "maybe"}, {"stop_patience": 0}, {"stop_min_object_score": "nan"}):
        with pytest.raises(PromptError):
            parse_stop_options(bad)


def _segmenter(model) -> MedSAM2Segmenter:
    settings = SegmenterSettings(window=parse_window("abdomen"), labels=LabelMap({"lesion": 1, "organ": 2}))
    return MedSAM2Segmenter(FixedModelProvider(model), settings, SessionCache(max_sessions=2, max_bytes=1 << 30))


def test_correction_adds_a_key_slice_and_refines_the_last_mask(model, tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(blob_volume((14, 40, 48), radius=8.0, seed=5)), str(path))
    seg = _segmenter(model)
    first_req = {"prompts": [{"label": "lesion", "slice": 6, "box": [10, 8, 36, 30]}], "client_id": "c"}
    _, first, _ = seg.segment_3d(str(path), first_req)
    assert first["check_slices"]["lesion"] and first["hint"].startswith("Check first")
    assert set(first["confidence"]["lesion"]) == {str(f) for f in range(14)}
    target = first["check_slices"]["lesion"][0]["slice"]
    fix = {"prompts": [{"label": "lesion", "slice": target, "foreground": [[20, 18]]}], "correction": True}
    label, second, _ = seg.segment_3d(str(path), {**fix, "client_id": "c"})
    assert second["correction"] and second["session"]["reused"] and "warnings" not in second
    assert sorted(p["slice"] for p in second["prompts_in_session"]) == sorted({6, target})
    session = next(iter(seg.sessions._entries.values())).session
    assert ("lesion", target) in session.prompt_masks  # the click refines the mask the user saw there
    # clicks on the key slice itself merge with its box
    more = {"prompts": [{"label": "lesion", "slice": 6, "background": [[2, 2]]}], "correction": True, "client_id": "c"}
    _, third, _ = seg.segment_3d(str(path), more)
    on_key = [p for p in third["prompts_in_session"] if p["slice"] == 6][0]
    assert on_key["box"] == [10, 8, 36, 30] and on_key["background"] == [[2, 2]]
    # without `correction` a request replaces the label's prompts
    _, fourth, _ = seg.segment_3d(str(path), first_req)
    assert [p["slice"] for p in fourth["prompts_in_session"]] == [6] and not session.prompt_masks
    assert label.shape == (14, 40, 48)


def test_a_correction_on_a_session_without_earlier_prompts_says_so(model, tmp_path):
    """A session dropped from the cache (or a new client) loses the earlier key slices: the answer must say so."""
    import SimpleITK as sitk

    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(blob_volume((10, 32, 32), radius=6.0, seed=2)), str(path))
    seg = _segmenter(model)
    fix = {"prompts": [{"label": "lesion", "slice": 4, "foreground": [[16, 16]]}], "correction": True}
    _, out, _ = seg.segment_3d(str(path), {**fix, "client_id": "evicted"})
    assert not out["session"]["reused"] and len(out["warnings"]) == 1
    assert "lesion" in out["warnings"][0] and "max_sessions" in out["warnings"][0]
    assert out["hint"].startswith("Correction of lesion")
    _, again, _ = seg.segment_3d(str(path), {**fix, "client_id": "evicted"})  # now it has earlier prompts
    assert "warnings" not in again
