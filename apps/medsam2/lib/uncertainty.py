"""How unsure the model is about a study, from its own signals along a short propagation."""

from __future__ import annotations

import numpy as np
import torch

from .prompts import KeySlicePrompt
from .propagation import propagate_volume
from .volume_session import VolumeSession


def object_score_entropy(scores: list[float]) -> float:
    """Mean binary entropy (bits) of SAM2's object-presence probability: 1 = coin flip, 0 = certain."""
    p = torch.sigmoid(torch.tensor(scores, dtype=torch.float64)).clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log2()) - (1 - p) * (1 - p).log2()).mean())


def propagation_uncertainty(session: VolumeSession, half_span: int = 8, box_fraction: float = 0.5) -> float:
    """Prompt a central box on the middle slice, propagate ``half_span`` slices each way, return the mean
    object-score entropy and the mask's slice-to-slice instability (both in [0, 1]), averaged."""
    n, rows, cols = session.frames.shape
    key = n // 2
    mx, my = cols * (1 - box_fraction) / 2, rows * (1 - box_fraction) / 2
    prompt = KeySlicePrompt("probe", 1, key, box=(mx, my, cols - 1 - mx, rows - 1 - my))
    result = propagate_volume(session, [prompt], (max(0, key - half_span), min(n - 1, key + half_span)))
    scores = [result.object_scores["probe"][f] for f in sorted(result.object_scores["probe"])]
    frames = sorted(result.logits["probe"])
    masks = [(result.logits["probe"][f] > 0).cpu().numpy() for f in frames]
    changes = []
    for a, b in zip(masks, masks[1:], strict=False):
        union = np.logical_or(a, b).sum()
        changes.append(0.0 if union == 0 else 1.0 - np.logical_and(a, b).sum() / union)
    instability = float(np.mean(changes)) if changes else 0.0
    return 0.5 * object_score_entropy(scores) + 0.5 * instability
