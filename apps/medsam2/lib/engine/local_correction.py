"""Local corrections: a correction on one slice re-tracks outward from that slice only, and only as far as it changes
anything.

A full recompute re-runs both passes of the label over the whole volume with one more key slice, so each correction
costs more than the first answer. Here the corrected slice is segmented (SAM2 refining its previous mask with the
new clicks), then tracked in each direction from it, with the memory bank SAM2 would hold there: the label's key
slices (the nearest ``max_key_slices``) and the memories and object pointers the previous answer computed for the
slices just behind it (:class:`lib.engine.propagation.TrackMemory`), in the same window. Each direction stops once
its masks agree with the previous answer over ``CorrectionRule.slices`` consecutive slices; beyond, the previous
answer stands. The result is the previous one with the re-tracked slices replaced, and its memory updated, so the
next correction starts from it.

Not done locally (``None``: the caller recomputes in full): a label without a kept memory, a changed set of key
slices other than the corrected one, a corrected mask outside the window the label was tracked on, a tracked mask
reaching the window's border.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from lib.engine.precision import autocast_for
from lib.engine.prompts import KeySlicePrompt
from lib.engine.propagation import (
    CorrectionRule,
    PropagationResult,
    TrackingOptions,
    TrackMemory,
    _prev_mask,
    _track_frames,
    segment_key_slice,
)
from lib.engine.roi import Window, crop_output, model_view
from lib.engine.volume_session import VolumeSession


@dataclasses.dataclass
class _Walk:
    """What one direction's walk from the corrected slice produced."""

    logits: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    scores: dict[int, float] = dataclasses.field(default_factory=dict)
    ious: dict[int, float] = dataclasses.field(default_factory=dict)
    memories: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    steps: int = 0


def _agree(new: torch.Tensor, old: torch.Tensor | None, min_dice: float) -> bool:
    a = new > 0
    b = old > 0 if old is not None else torch.zeros_like(a)
    total = int(a.sum()) + int(b.sum())
    return total == 0 or 2 * int((a & b).sum()) / total >= min_dice


@torch.inference_mode()
def correct_locally(
    session: VolumeSession,
    previous: PropagationResult,
    prompts: Sequence[KeySlicePrompt],
    corrected: int,
    rule: CorrectionRule,
    tracking: TrackingOptions,
    slice_range: tuple[int, int] | None = None,
    mask_inputs: dict[tuple[str, int], torch.Tensor] | None = None,
) -> PropagationResult | None:
    """The previous answer with one label corrected on slice ``corrected`` (``prompts``: all the label's key-slice
    prompts, the corrected one included), re-tracked outward from that slice only; None where it cannot be done
    locally (see the module docstring)."""
    label = prompts[0].label
    memory = previous.memory
    if memory is None or label not in memory.key_outputs or label not in previous.logits:
        return None
    by_slice = {p.slice_index: p for p in prompts}
    if corrected not in by_slice or set(memory.key_outputs[label]) - {corrected} != set(by_slice) - {corrected}:
        return None
    t0 = time.perf_counter()
    n = session.num_slices
    lo, hi = slice_range if slice_range is not None else (0, n - 1)
    keys = dict(memory.key_outputs[label])
    with autocast_for(session.device, session.compute_dtype):
        prompt = by_slice[corrected]
        prior = _prev_mask(mask_inputs, prompt, session.device)
        keys[corrected] = segment_key_slice(session, prompt, encode_memory=True, prev_mask_logits=prior)
        t_key = time.perf_counter()
        walks = {}
        for sign in (+1, -1):
            walk = _walk(session, memory, label, keys, corrected, sign, (lo, hi), previous, rule, tracking)
            if walk is None:
                return None
            walks[sign] = walk
    return _updated(previous, label, keys, corrected, walks, memory, t0, t_key)


def _walk(
    session: VolumeSession,
    memory: TrackMemory,
    label: str,
    keys: dict[int, dict],
    corrected: int,
    sign: int,
    span: tuple[int, int],
    previous: PropagationResult,
    rule: CorrectionRule,
    tracking: TrackingOptions,
) -> _Walk | None:
    """Track from the corrected slice in one direction until the masks agree with the previous answer."""
    n = session.num_slices
    window = memory.windows.get((label, sign))
    grow = tracking.overflow == "grow"
    if grow and window is not None and bool(window.touches_border(window.crop(keys[corrected]["pred_masks"])).any()):
        return None  # the corrected mask leaves the window the label was tracked on
    coord = (lambda s: s) if sign > 0 else (lambda s: n - 1 - s)  # SAM2's frame index: increasing along the walk
    od = _memory_bank(memory, label, keys, corrected, sign, window, coord)
    view = model_view(session.model, window, tracking.max_key_slices)
    horizon = max(session.model.num_maskmem, session.model.max_obj_ptrs_in_encoder) + 1
    walk = _Walk()
    old = previous.logits[label]
    run = 0
    s = corrected + sign
    while span[0] <= s <= span[1]:
        if s in keys:  # another key slice: its own mask
            logits = keys[s]["pred_masks"][0, 0]
        else:
            out = _track_frames(session, od, [s], coord(s), horizon, view, window)
            walk.steps += 1
            if grow and window is not None and bool(window.touches_border(out["pred_masks"]).any()):
                return None
            full = window.paste(out["pred_masks"]) if window is not None else out["pred_masks"]
            logits = full[0, 0]
            walk.scores[s] = float(out["object_score_logits"][0, 0])
            walk.ious[s] = float(out["iou"][0])
            walk.memories[s] = (out["maskmem_features"][:1].to(torch.bfloat16), out["obj_ptr"][:1].float())
        walk.logits[s] = logits.to(torch.float16)
        run = run + 1 if _agree(logits, old.get(s), rule.min_dice) else 0
        if run >= rule.slices:
            break
        s += sign
    return walk


def _memory_bank(
    memory: TrackMemory,
    label: str,
    keys: dict[int, dict],
    corrected: int,
    sign: int,
    window: Window | None,
    coord,
) -> dict:
    """SAM2's output dict at the corrected slice: the key slices, and the previous answer's memories of the slices
    behind it (this direction's, else the other direction's when it tracked the same window)."""
    cond = {coord(k): crop_output(o, window) if window is not None else o for k, o in keys.items()}
    pos = next(iter(cond.values()))["maskmem_pos_enc"]
    behind = memory.slices.get((label, sign), {})
    other = memory.slices.get((label, -sign), {}) if memory.windows.get((label, -sign)) == window else {}
    non_cond = {}
    for t in range(1, 17):  # SAM2 reads at most num_maskmem memories and max_obj_ptrs pointers back
        s = corrected - sign * t
        entry = behind.get(s) or other.get(s)
        if entry is not None and s not in keys:
            non_cond[coord(s)] = {"maskmem_features": entry[0], "maskmem_pos_enc": pos, "obj_ptr": entry[1]}
    return {"cond_frame_outputs": cond, "non_cond_frame_outputs": non_cond}


def _updated(
    previous: PropagationResult,
    label: str,
    keys: dict[int, dict],
    corrected: int,
    walks: dict[int, _Walk],
    memory: TrackMemory,
    t0: float,
    t_key: float,
) -> PropagationResult:
    """The previous result with the walks' slices replaced (nothing of the previous result is changed in place)."""
    key_out = keys[corrected]
    logits = dict(previous.logits[label])
    scores = dict(previous.object_scores.get(label, {}))
    ious = dict(previous.predicted_iou.get(label, {}))
    logits[corrected] = key_out["pred_masks"][0, 0].to(torch.float16)
    scores[corrected] = float(key_out["object_score_logits"][0, 0])
    ious[corrected] = float(key_out["iou"][0])
    slices = dict(memory.slices)
    for sign, walk in walks.items():
        logits.update(walk.logits)
        scores.update(walk.scores)
        ious.update(walk.ious)
        per = dict(slices.get((label, sign), {}))
        per.update(walk.memories)
        slices[(label, sign)] = per
    new_memory = TrackMemory({**memory.key_outputs, label: keys}, dict(memory.windows), slices)
    walked = {("forward" if sign > 0 else "backward"): sorted(w.logits) for sign, w in walks.items()}
    t_end = time.perf_counter()
    return dataclasses.replace(
        previous,
        logits={**previous.logits, label: logits},
        object_scores={**previous.object_scores, label: scores},
        predicted_iou={**previous.predicted_iou, label: ious},
        key_slices={**previous.key_slices, label: sorted(keys)},
        memory=new_memory,
        latencies={"encode": 0.0, "key_slices": round(t_key - t0, 4), "track": round(t_end - t_key, 4)},
        steps=sum(w.steps for w in walks.values()),
        static_steps=0,
        tracking={
            **previous.tracking,
            "local_correction": {
                "slice": corrected,
                "retracked": {d: [s[0], s[-1]] if s else None for d, s in walked.items()},
                "steps": sum(w.steps for w in walks.values()),
            },
        },
    )
