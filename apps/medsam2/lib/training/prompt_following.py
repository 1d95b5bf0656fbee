"""Does a model follow the prompt? Scores measured through the engine's 3D propagation (a key-slice prompt,
propagated both ways), the way users segment, on volumes with several similar objects:

- ``box``: a tight box on each object's largest slice; Dice of that object and the overlap of the answer with the
  objects that were not prompted (:func:`lib.training.validation.other_object_overlap`);
- ``click``: one foreground click at the deepest point of each object on that slice, the same scores;
- ``wrong_box``: on the key slice of each object A, a box on the nearest other object B seen on that slice; the
  answer must be B (its Dice with B) and leave A alone (``overlap_with_first``: the share of A it covers);
- ``past_end``: the share of the slices beyond an object's first and last ones where its box answer is not empty.

Used by bench/reference_model.py (the reference model's committed scores) and the tests. No MONAI Label imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from lib.engine.prompts import KeySlicePrompt
from lib.engine.propagation import propagate_volume
from lib.engine.volume_session import VolumeSession
from lib.training.data import Study
from lib.training.metrics import dice_score
from lib.training.validation import key_slice_prompts, other_object_overlap


def tight_box(mask2d: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask2d)
    return float(xs.min()), float(ys.min()), float(max(xs.max(), xs.min() + 1)), float(max(ys.max(), ys.min() + 1))


def click_prompts(label: np.ndarray) -> list[KeySlicePrompt]:
    """Per object, one foreground click at its deepest point on its largest slice (what an annotator clicks)."""
    prompts = []
    for box_prompt in key_slice_prompts(label):
        inside = label[box_prompt.slice_index] == box_prompt.label_value
        depth = ndimage.distance_transform_edt(inside)
        y, x = np.unravel_index(int(depth.argmax()), depth.shape)
        prompts.append(
            KeySlicePrompt(box_prompt.label, box_prompt.label_value, box_prompt.slice_index, None, ((x, y),), (1,))
        )
    return prompts


def wrong_box_prompts(label: np.ndarray) -> list[tuple[int, KeySlicePrompt]]:
    """(first object A, a box on the nearest other object B on A's key slice, labelled with B's value) for each A
    that shares its key slice with another object."""
    pairs = []
    for prompt in key_slice_prompts(label):
        k, first = prompt.slice_index, prompt.label_value
        others = [int(v) for v in np.unique(label[k]) if v not in (0, first)]
        if not others:
            continue
        distance = ndimage.distance_transform_edt(label[k] != first)
        nearest = min(others, key=lambda v: float(distance[label[k] == v].min()))
        box = tight_box(label[k] == nearest)
        pairs.append((first, KeySlicePrompt(f"{nearest}_on_{first}", nearest, k, box=box)))
    return pairs


@dataclass
class PromptScores:
    """Per prompt kind, one entry per prompted object."""

    dice: dict[str, list[float]] = field(default_factory=dict)
    overlap: dict[str, list[float]] = field(default_factory=dict)
    past_end: list[tuple[int, int]] = field(default_factory=list)  # (slices beyond the ends with a mask, slices beyond)

    def add(self, kind: str, dice: float, overlap: float | None) -> None:
        self.dice.setdefault(kind, []).append(dice)
        if overlap is not None:
            self.overlap.setdefault(kind, []).append(overlap)

    def summary(self) -> dict:
        out = {}
        for kind, values in self.dice.items():
            over = self.overlap.get(kind, [])
            out[kind] = {
                "objects": len(values),
                "dice_mean": round(float(np.mean(values)), 4),
                "dice_min": round(float(np.min(values)), 4),
                "overlap_mean": round(float(np.mean(over)), 4) if over else None,
                "overlap_max": round(float(np.max(over)), 4) if over else None,
                "overlap_at_most_0.1": round(float(np.mean(np.array(over) <= 0.1)), 4) if over else None,
            }
        filled, beyond = (sum(x) for x in zip(*self.past_end, strict=True)) if self.past_end else (0, 0)
        out["past_end"] = {
            "slices_beyond_ends": beyond,
            "with_a_mask": filled,
            "share": round(filled / max(beyond, 1), 4),
        }
        return out


def _propagated(model, study: Study, prompts: Sequence[KeySlicePrompt], device, dtype):
    session = VolumeSession(study.frames, model, device, dtype, dtype or torch.float32)
    return propagate_volume(session, prompts)


def _score_kind(scores: PromptScores, kind: str, model, study: Study, prompts: list[KeySlicePrompt], device, dtype):
    result = _propagated(model, study, prompts, device, dtype)
    for p in prompts:
        pred = result.binary_mask(p.label)
        scores.add(
            kind, dice_score(pred, study.label == p.label_value), other_object_overlap(pred, study.label, p.label_value)
        )
        if kind == "box":
            first, last = study.extents[p.label_value]
            beyond = np.r_[0:first, last + 1 : study.label.shape[0]]
            scores.past_end.append((int(pred[beyond].any(axis=(1, 2)).sum()), int(beyond.size)))


@torch.inference_mode()
def score_prompt_following(model, studies: Sequence[Study], device, dtype=None) -> PromptScores:
    """Box, click and wrong-box scores of ``model`` (in eval mode) on ``studies``."""
    scores = PromptScores()
    model.eval()
    for study in studies:
        _score_kind(scores, "box", model, study, key_slice_prompts(study.label), device, dtype)
        _score_kind(scores, "click", model, study, click_prompts(study.label), device, dtype)
        pairs = wrong_box_prompts(study.label)
        if not pairs:
            continue
        result = _propagated(model, study, [p for _, p in pairs], device, dtype)
        for first, p in pairs:
            pred = result.binary_mask(p.label)
            first_mask = study.label == first
            scores.add(
                "wrong_box",
                dice_score(pred, study.label == p.label_value),
                float((pred & first_mask).sum() / first_mask.sum()),
            )
    return scores
