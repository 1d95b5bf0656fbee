"""Validation the way users segment: a box on each object's largest slice, 3D propagation with the serving
engine, scored with Dice and NSD, and for prompt sensitivity the overlap of each answer with the objects that were
not prompted (every object's box is the wrong box for the others: a model that ignores the prompt and returns the
same object, or all of them, whatever the box, covers the other objects)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lib.engine.prompts import KeySlicePrompt
from lib.engine.propagation import propagate_volume
from lib.engine.volume_session import VolumeSession
from lib.training.data import Study
from lib.training.metrics import dice_score, nsd_score


def key_slice_prompts(label: np.ndarray) -> list[KeySlicePrompt]:
    """What an annotator would draw: per label value, a tight box on the slice with the largest area."""
    prompts = []
    for value in (int(v) for v in np.unique(label) if v != 0):
        mask = label == value
        areas = mask.reshape(mask.shape[0], -1).sum(1)
        k = int(areas.argmax())
        ys, xs = np.nonzero(mask[k])
        box = (float(xs.min()), float(ys.min()), float(max(xs.max(), xs.min() + 1)), float(max(ys.max(), ys.min() + 1)))
        prompts.append(KeySlicePrompt(str(value), value, k, box=box))
    return prompts


def other_object_overlap(pred: np.ndarray, label: np.ndarray, value: int) -> float | None:
    """The largest share of a not-prompted object's voxels (label values other than ``value``) that the answer
    ``pred`` covers: 0 when it leaves every other object alone, 1 when it takes one whole; None without another
    object."""
    sizes = np.bincount(label.ravel(), minlength=256)
    covered = np.bincount(label[pred], minlength=256)
    others = [v for v in np.nonzero(sizes)[0] if v not in (0, value)]
    return max(float(covered[v] / sizes[v]) for v in others) if others else None


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


@torch.inference_mode()
def evaluate(model, studies: Sequence[Study], device, compute_dtype, tolerance_mm: float) -> dict:
    """Per label value, propagated from a box on each object's largest slice: Dice and NSD of the prompted object
    and ``other_overlap`` (:func:`other_object_overlap`; None where a study has a single object)."""
    was_training = model.training
    model.eval()
    per_label: dict[str, list[tuple[float, float, float | None]]] = {}
    try:
        for study in studies:
            prompts = key_slice_prompts(study.label)
            if not prompts:
                continue
            session = VolumeSession(study.frames, model, device, compute_dtype, compute_dtype or torch.float32)
            result = propagate_volume(session, prompts)
            for p in prompts:
                pred = result.binary_mask(p.label)
                gt = study.label == p.label_value
                nsd = nsd_score(pred, gt, study.spacing_kji, tolerance_mm)
                overlap = other_object_overlap(pred, study.label, p.label_value)
                per_label.setdefault(p.label, []).append((dice_score(pred, gt), nsd, overlap))
    finally:
        model.train(was_training)
    return _summary(per_label)


def _summary(per_label: dict[str, list[tuple[float, float, float | None]]]) -> dict:
    summary = {
        k: {"dice": float(np.mean([s[0] for s in v])), "nsd": float(np.mean([s[1] for s in v]))}
        | ({"other_overlap": o} if (o := _mean([s[2] for s in v])) is not None else {})
        for k, v in per_label.items()
    }
    scores = [s for v in per_label.values() for s in v]
    return {
        "dice": float(np.mean([s[0] for s in scores])) if scores else 0.0,
        "nsd": float(np.mean([s[1] for s in scores])) if scores else 0.0,
        "other_overlap": _mean([s[2] for s in scores]),
        "per_label": summary,
    }
