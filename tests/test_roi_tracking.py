"""Region-of-interest tracking and local corrections (lib/engine/roi.py, lib/engine/local_correction.py) against
the reference: full-frame tracking and a full recompute, with the reference model on generated volumes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import ndimage

from lib.engine import sam2_api
from lib.engine.cpu_inference import use_cpu_inference_modules
from lib.engine.local_correction import correct_locally
from lib.engine.prompts import KeySlicePrompt
from lib.engine.propagation import CorrectionRule, TrackingOptions, propagate_volume
from lib.engine.roi import Window, margin_cells, model_view, window_around
from lib.engine.volume_session import VolumeSession
from lib.errors import CropUnavailable
from lib.training.synthetic import held_out_studies
from lib.training.validation import key_slice_prompts

ROI = TrackingOptions(region="roi", keep_memory=True, max_key_slices=4)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


@pytest.fixture(scope="module")
def study():
    """A held-out volume (32 x 64 x 64, two objects) the reference model segments well (box Dice ~0.97)."""
    return held_out_studies(1, start=1)[0]


def test_window_math():
    """A window around a mask's cells plus the margin, kept on the frame; crop and paste are inverse; a mask at a
    border the frame does not share touches it; grown past the frame it is the whole frame (None)."""
    logits = torch.full((1, 1, 32, 32), -5.0)
    logits[..., 12:16, 20:24] = 3.0  # cells 3 and 5 on an 8-cell grid (4 low-res pixels a cell)
    w = window_around([logits], grid=8, margin=1)
    assert w == Window(top=2, left=4, height=3, width=3, grid=8)
    assert margin_cells(0.125, 8) == 1 and margin_cells(0.125, 32) == 4 and margin_cells(0.0, 8) == 1
    crop = w.crop(logits)
    assert crop.shape[-2:] == (12, 12) and torch.equal(w.paste(crop, -5.0), logits)
    assert not bool(w.touches_border(crop).any())
    crop[..., 0, 5] = 1.0
    assert bool(w.touches_border(crop).all())
    assert window_around([torch.full((1, 1, 32, 32), -1.0)], 8, 1) is None  # empty: no window
    assert w.grown(3) is None
    wide = torch.full((1, 1, 32, 32), -5.0)
    wide[..., 12:16, 4:24] = 3.0  # one cell tall, five wide
    assert window_around([wide], 8, 1) == Window(top=2, left=0, height=3, width=7, grid=8)
    assert window_around([wide], 8, 1, square=True) == Window(top=0, left=0, height=7, width=7, grid=8)
    crop = window_around([wide], 8, 1).crop(wide)
    assert crop.shape[-2:] == (12, 28) and torch.equal(window_around([wide], 8, 1).paste(crop, -5.0), wide)
    assert window_around([wide], 8, 1).grown(1) == Window(top=1, left=0, height=5, width=8, grid=8)  # full width
    assert window_around([wide], 8, 1).grown(3) is None


def test_heads_on_a_window_match_sam2s_on_a_square_map(reference_model):
    """The heads a rectangular window runs (sam2_api.tracked_slice_heads) give SAM2's own outputs on a square map."""
    torch.manual_seed(0)
    side = reference_model.sam_image_embedding_size
    dim = reference_model.hidden_dim
    pix = torch.randn(2, dim, side, side)
    high = [torch.randn(2, dim // 8, 4 * side, 4 * side), torch.randn(2, dim // 4, 2 * side, 2 * side)]
    for multimask in (False, True):
        args = {"backbone_features": pix, "high_res_features": high, "multimask_output": multimask}
        with torch.no_grad():
            ours = sam2_api.tracked_slice_heads(reference_model, **args)
            stock = sam2_api.forward_sam_heads(reference_model, point_inputs=None, mask_inputs=None, **args)
        for a, b in zip(ours, stock, strict=True):
            assert torch.allclose(a, b, atol=1e-5), multimask


def test_roi_tracking_matches_full_frame_on_objects_inside_the_crop(reference_model, study):
    """Dice >= 0.98 per object between region-of-interest and full-frame tracking, on windows smaller than the
    frame that no mask outgrew; two workers (on the CPU modules) give the same masks as one."""
    session = VolumeSession(study.frames, reference_model)
    prompts = key_slice_prompts(study.label)
    full = propagate_volume(session, prompts)
    roi = propagate_volume(session, prompts, tracking=ROI)
    assert roi.tracking["regrown"] == 0
    assert all(w != "full" and w["height"] * w["width"] < w["grid"] ** 2 for w in roi.tracking["windows"].values())
    fast = copy.deepcopy(reference_model)  # two workers run on the CPU modules only
    use_cpu_inference_modules(fast)
    fast_session = VolumeSession(study.frames, fast)
    two = propagate_volume(fast_session, prompts, tracking=TrackingOptions(region="roi", workers=2))
    assert two.tracking["workers"] == 2
    for p in prompts:
        assert dice(full.binary_mask(p.label), roi.binary_mask(p.label)) >= 0.98
        assert dice(two.binary_mask(p.label), roi.binary_mask(p.label)) >= 0.99


def test_rectangular_windows_match_full_frame_tracking(reference_model):
    """On the CPU modules (rotary encodings told the window's shape) a window is the object's bounding rectangle
    plus the margin, not a square: Dice >= 0.98 against full-frame tracking on objects that stay inside it."""
    fast = copy.deepcopy(reference_model)
    use_cpu_inference_modules(fast)
    shapes = set()
    for study in held_out_studies(1, start=2):  # its third object's window is 6 x 5 cells
        prompts = key_slice_prompts(study.label)
        full = propagate_volume(VolumeSession(study.frames, reference_model), prompts)
        rect = propagate_volume(VolumeSession(study.frames, fast), prompts, tracking=TrackingOptions(region="roi"))
        assert rect.tracking["regrown"] == 0
        shapes |= {(w["height"], w["width"]) for w in rect.tracking["windows"].values()}
        for p in prompts:
            assert dice(full.binary_mask(p.label), rect.binary_mask(p.label)) >= 0.98, p.label
    assert any(h != w for h, w in shapes), shapes


def test_local_correction_matches_a_full_recompute_near_the_corrected_slice(reference_model, study):
    """A click four slices from the key slice: the local correction re-tracks a few slices each way (fewer steps
    than the full recompute) and matches the full recompute exactly on the corrected slice and within Dice 0.97 on
    its two neighbours each way; a key-slice view bounds the key slices SAM2 attends to."""
    session = VolumeSession(study.frames, reference_model)
    box = key_slice_prompts(study.label)[0]
    first = propagate_volume(session, [box], tracking=ROI)
    inside = study.label == box.label_value
    c = box.slice_index + 4
    y, x = np.unravel_index(int(ndimage.distance_transform_edt(inside[c]).argmax()), inside[c].shape)
    click = KeySlicePrompt(box.label, box.label_value, c, None, ((float(x), float(y)),), (1,))
    prior = {(box.label, c): first.logits[box.label][c].float()}
    full = propagate_volume(session, [box, click], tracking=ROI, mask_inputs=prior)
    local = correct_locally(session, first, [box, click], c, CorrectionRule(), ROI, mask_inputs=prior)
    assert local is not None and local.steps < full.steps
    a, b = full.binary_mask(box.label), local.binary_mask(box.label)
    assert np.array_equal(a[c], b[c])
    assert all(dice(a[k], b[k]) >= 0.97 for k in (c - 2, c - 1, c + 1, c + 2))
    assert local.key_slices[box.label] == [box.slice_index, c]
    assert first.logits[box.label][c] is not local.logits[box.label][c]  # the previous answer is left as it was
    assert model_view(reference_model, None, 4).max_cond_frames_in_attn == 4
    assert model_view(reference_model) is reference_model


def test_roi_asked_for_with_an_empty_key_mask_is_crop_unavailable(reference_model, study):
    """A request that asks for ``tracking_region: roi`` with an empty key-slice mask gets CropUnavailable (422)
    naming the label; without asking, the label is tracked on the whole frame."""
    empty = KeySlicePrompt("lesion", 1, 10, mask=np.zeros(study.frames.shape[1:], dtype=bool))
    session = VolumeSession(study.frames, reference_model)
    strict = TrackingOptions(region="roi", strict=True)
    with pytest.raises(CropUnavailable, match="'lesion'.*tracking_region"):
        propagate_volume(session, [empty], slice_range=(8, 12), tracking=strict)
    result = propagate_volume(session, [empty], slice_range=(8, 12), tracking=TrackingOptions(region="roi"))
    assert result.tracking["windows"] == {"lesion:backward": "full", "lesion:forward": "full"}
