"""The engine computes what SAM2's stock video predictor computes (fp32, CPU, random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import sam2.sam2_video_predictor as stock_module
import torch

from lib.engine.mask_prompts import Strokes, resolve_drawn
from lib.engine.preprocessing import frames_to_model_input, parse_window, to_uint8
from lib.engine.prompts import KeySlicePrompt
from lib.engine.propagation import propagate_volume, segment_key_slice, upsample_logits
from lib.engine.volume_session import VolumeSession
from sam2_testing import blob_volume, small_model

pytestmark = pytest.mark.slow  # 12-115 s per test on 2 CPU cores

TOL = 1e-3  # max |logit difference| allowed (fp32 on CPU; memory features are stored in bf16 by both)


def tolerance(want: torch.Tensor) -> float:
    """TOL, plus the rounding of the float16 the engine keeps propagated logits in (a mask prompt's are +-10)."""
    return TOL + 2.0**-10 * want.abs().max().item()


@pytest.fixture(scope="module")
def model():
    return small_model(seed=1)


@pytest.fixture(scope="module")
def frames():
    return to_uint8(blob_volume((14, 48, 56), radius=9.0), parse_window("abdomen"))


def stock_logits(model, frames, prompts_by_obj, reverse, monkeypatch):
    """Run the stock predictor (frames in memory), one state, all objects, one direction."""
    n, rows, cols = frames.shape
    images = frames_to_model_input(frames, model.image_size)
    monkeypatch.setattr(stock_module, "load_video_frames", lambda **kw: (images, rows, cols))
    state = model.init_state(video_path="in-memory")
    for obj_id, prompt in prompts_by_obj.items():
        if prompt.mask is not None and not prompt.has_clicks_or_box():
            model.add_new_mask(state, frame_idx=prompt.slice_index, obj_id=obj_id, mask=torch.from_numpy(prompt.mask))
            continue
        points = [list(p) for p in prompt.points] or None
        model.add_new_points_or_box(
            state,
            frame_idx=prompt.slice_index,
            obj_id=obj_id,
            box=list(prompt.box) if prompt.box else None,
            points=points,
            labels=list(prompt.point_labels) if points else None,
        )
    out = {}
    for frame, obj_ids, masks in model.propagate_in_video(state, reverse=reverse):
        for idx, obj_id in enumerate(obj_ids):
            out[(obj_id, frame)] = masks[idx, 0].float()
    return out


def _lasso_prompt(key: int) -> KeySlicePrompt:
    """A lasso (a filled outline) alone on a slice: the engine's mask prompt."""
    outline = np.array([[12.0, 10.0], [40.0, 14.0], [44.0, 36.0], [20.0, 40.0], [8.0, 25.0]])
    rows, cols = 48, 56
    drawn = KeySlicePrompt("organ", 2, key, strokes=Strokes(foreground_lasso=(outline,)))
    return resolve_drawn(drawn, None, "points", rows, cols)


BOX_AND_CLICK = KeySlicePrompt("organ", 2, 7, box=(5.0, 6.0, 30.0, 40.0), points=((20.0, 20.0),), point_labels=(1,))


@pytest.mark.parametrize("second", ["box and click", "lasso as mask prompt"])
def test_key_slice_and_propagation_match_stock(model, frames, monkeypatch, second):
    n, rows, cols = frames.shape
    key = 7
    prompts = {
        1: KeySlicePrompt("lesion", 1, key, box=(18.0, 14.0, 40.0, 34.0)),
        2: BOX_AND_CLICK if second == "box and click" else _lasso_prompt(key),
    }
    if second != "box and click":
        assert prompts[2].mask is not None and prompts[2].mask.sum() > 400 and not prompts[2].has_clicks_or_box()
    session = VolumeSession(frames, model)
    result = propagate_volume(session, list(prompts.values()))

    expected = {}
    for reverse in (False, True):
        got = stock_logits(model, frames, prompts, reverse, monkeypatch)
        for (obj_id, frame), logit in got.items():
            prev = expected.get((obj_id, frame))
            expected[(obj_id, frame)] = logit if prev is None else torch.maximum(prev, logit)

    checked = 0
    positive = 0
    for (obj_id, frame), want in expected.items():
        label = prompts[obj_id].label
        mine = upsample_logits(result.logits[label][frame][None, None], rows, cols)[0]
        diff = (mine - want).abs().max().item()
        assert diff < tolerance(want), f"label {label} slice {frame}: max |diff| {diff}"
        assert torch.equal(mine > 0, want > 0) or diff < TOL
        checked += 1
        positive += int((want > 0).sum())
    assert checked == 2 * n
    # not a vacuous comparison: the stock masks have both foreground and background
    assert 0 < positive < checked * rows * cols  # every slice, both labels
    # the engine visited each slice once per label per direction, in batched steps
    assert result.steps == max(key, n - 1 - key)


def test_key_slice_alone_matches_stock_first_frame(model, frames, monkeypatch):
    n, rows, cols = frames.shape
    prompt = KeySlicePrompt("lesion", 1, 3, box=(10.0, 8.0, 44.0, 40.0), points=((30.0, 20.0),), point_labels=(0,))
    session = VolumeSession(frames, model)
    mine = upsample_logits(segment_key_slice(session, prompt)["pred_masks"], rows, cols)[0]
    want = stock_logits(model, frames, {1: prompt}, False, monkeypatch)[(1, 3)]
    assert (mine - want).abs().max().item() < TOL
    assert 0 < int((want > 0).sum()) < rows * cols


def test_mask_prompt_alone_matches_stock_add_new_mask(model, frames, monkeypatch):
    n, rows, cols = frames.shape
    prompt = _lasso_prompt(4)
    session = VolumeSession(frames, model)
    mine = upsample_logits(segment_key_slice(session, prompt)["pred_masks"], rows, cols)[0]
    want = stock_logits(model, frames, {1: prompt}, False, monkeypatch)[(1, 4)]
    assert (mine - want).abs().max().item() < TOL
    assert ((want > 0).numpy() == prompt.mask).mean() > 0.97  # SAM2 keeps the drawn mask (resized in and out)


def test_long_volume_steady_state_path_matches_stock(model, monkeypatch):
    """40 slices: both directions run well past the point where the static (CUDA-graph-ready) step takes over."""
    frames = to_uint8(blob_volume((40, 32, 40), radius=7.0, seed=5), parse_window("abdomen"))
    n, rows, cols = frames.shape
    key = 20
    prompts = {1: KeySlicePrompt("lesion", 1, key, box=(10.0, 8.0, 30.0, 24.0))}
    session = VolumeSession(frames, model)
    steady = propagate_volume(session, list(prompts.values()))
    eager = propagate_volume(session, list(prompts.values()), steady=False)
    assert steady.static_steps == 20 and eager.static_steps == 0  # steps 1..20 ran from static buffers
    expected = {}
    for reverse in (False, True):
        for (_, frame), logit in stock_logits(model, frames, prompts, reverse, monkeypatch).items():
            prev = expected.get(frame)
            expected[frame] = logit if prev is None else torch.maximum(prev, logit)
    assert sorted(expected) == list(range(n))
    positive = 0
    for frame, want in expected.items():
        for result in (steady, eager):
            mine = upsample_logits(result.logits["lesion"][frame][None, None], rows, cols)[0]
            diff = (mine - want).abs().max().item()
            assert diff < TOL, f"slice {frame}: max |diff| {diff}"
        positive += int((want > 0).sum())
    assert 0 < positive < n * rows * cols
