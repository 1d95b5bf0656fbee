"""Validation the way users segment: a box on each object's largest slice, 3D propagation with the serving
engine, scored with Dice and NSD."""

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


@torch.inference_mode()
def evaluate(model, studies: Sequence[Study], device, compute_dtype, tolerance_mm: float) -> dict:
    """Propagated Dice/NSD per label value, prompted with a box on each object's largest slice."""
    was_training = model.training
    model.eval()
    per_label: dict[str, list[tuple[float, float]]] = {}
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
                per_label.setdefault(p.label, []).append((dice_score(pred, gt), nsd))
    finally:
        model.train(was_training)
    summary = {
        k: {"dice": float(np.mean([d for d, _ in v])), "nsd": float(np.mean([n for _, n in v]))}
        for k, v in per_label.items()
    }
    all_scores = [s for v in per_label.values() for s in v]
    return {
        "dice": float(np.mean([d for d, _ in all_scores])) if all_scores else 0.0,
        "nsd": float(np.mean([n for _, n in all_scores])) if all_scores else 0.0,
        "per_label": summary,
    }
