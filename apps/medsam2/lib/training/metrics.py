"""Segmentation scores of a predicted mask against the ground truth: Dice and normalised surface Dice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, gt).sum() / total)


def nsd_score(pred: np.ndarray, gt: np.ndarray, spacing_kji: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice (MONAI's implementation) at ``tolerance_mm``."""
    from monai.metrics import compute_surface_dice

    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    p = torch.from_numpy(np.stack([~pred, pred]))[None].float()
    g = torch.from_numpy(np.stack([~gt, gt]))[None].float()
    value = compute_surface_dice(p, g, [tolerance_mm], include_background=False, spacing=list(spacing_kji))
    return float(value.nan_to_num(0.0).mean())
