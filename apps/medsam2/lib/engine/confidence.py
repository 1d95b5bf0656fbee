"""Confidence from SAM2's own signals: per slice after a propagation (and the slices most worth an annotator's
check: lowest confidence, or a mask that changes sharply from its neighbour), and per study (how unsure the model
is about it, for the active-learning strategy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lib.engine.prompts import KeySlicePrompt
from lib.engine.propagation import PropagationResult, propagate_volume
from lib.engine.volume_session import VolumeSession


def slice_confidence(result: PropagationResult) -> dict[str, dict[int, float]]:
    """Per label and propagated slice, in [0, 1]: how sure SAM2 is of what it returned there.

    Where the slice has a mask: P(object present) x predicted IoU of the mask (both SAM2's own heads).
    Where it has none: P(object absent). Key slices are scored the same way.
    """
    out: dict[str, dict[int, float]] = {}
    for name, per in result.logits.items():
        scores = result.object_scores.get(name, {})
        ious = result.predicted_iou.get(name, {})
        conf: dict[int, float] = {}
        for frame, logits in per.items():
            present = 1.0 / (1.0 + math.exp(-max(min(scores.get(frame, 0.0), 50.0), -50.0)))
            if bool((logits > 0).any()):
                conf[frame] = present * min(max(ious.get(frame, 0.0), 0.0), 1.0)
            else:
                conf[frame] = 1.0 - present
        out[name] = conf
    return out


def neighbour_overlap(result: PropagationResult) -> dict[str, dict[int, float]]:
    """Per label and slice: IoU of its mask with the neighbouring slice's mask on the side of the nearest key
    slice (the slice it was propagated from); 1.0 where both are empty."""
    out: dict[str, dict[int, float]] = {}
    for name, per in result.logits.items():
        keys = set(result.key_slices.get(name, []))
        overlap: dict[int, float] = {}
        for frame, logits in per.items():
            neighbour = per.get(_neighbour_of(frame, keys))
            if frame in keys or neighbour is None:
                continue
            a, b = logits > 0, neighbour > 0
            union = int((a | b).sum())
            overlap[frame] = 1.0 if union == 0 else int((a & b).sum()) / union
        out[name] = overlap
    return out


@dataclass(frozen=True)
class SliceToCheck:
    """A slice an annotator should look at, and why."""

    slice: int
    confidence: float
    overlap_with_neighbour: float | None
    reason: str

    def as_json(self) -> dict:
        return {
            "slice": self.slice,
            "confidence": round(self.confidence, 3),
            "overlap_with_neighbour": _rounded(self.overlap_with_neighbour),
            "reason": self.reason,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def slices_to_check(
    result: PropagationResult,
    confidence: dict[str, dict[int, float]] | None = None,
    count: int = 5,
    min_gap: int = 3,
) -> dict[str, list[SliceToCheck]]:
    """Per label, up to ``count`` slices ranked by doubt: 1 - confidence, or 1 - overlap with the neighbour,
    whichever is larger. Key slices (drawn by the user) are skipped; picks are ``min_gap`` slices apart."""
    confidence = confidence if confidence is not None else slice_confidence(result)
    overlaps = neighbour_overlap(result)
    out: dict[str, list[SliceToCheck]] = {}
    for name, conf in confidence.items():
        keys = set(result.key_slices.get(name, []))
        ranked = []
        for frame, c in conf.items():
            if frame in keys:
                continue
            o = overlaps.get(name, {}).get(frame)
            doubt_conf = 1.0 - c
            doubt_change = 0.0 if o is None else 1.0 - o
            ranked.append((max(doubt_conf, doubt_change), frame, c, o, doubt_change > doubt_conf))
        ranked.sort(key=lambda r: (-r[0], r[1]))
        picks: list[SliceToCheck] = []
        for _, frame, c, o, by_change in ranked:
            if len(picks) >= count:
                break
            if any(abs(frame - p.slice) < min_gap for p in picks):
                continue
            neighbour = _neighbour_of(frame, keys)
            reason = (
                f"the mask changes sharply from slice {neighbour} (overlap {o:.2f})"
                if by_change
                else f"low confidence ({c:.2f})"
            )
            picks.append(SliceToCheck(frame, c, o, reason))
        out[name] = picks
    return out


def _neighbour_of(frame: int, keys: set[int]) -> int:
    """The slice ``frame`` was propagated from: its neighbour on the side of the nearest key slice."""
    if not keys:
        return frame - 1
    nearest = min(keys, key=lambda k: abs(k - frame))
    return frame - 1 if frame > nearest else frame + 1


def check_hint(picks: dict[str, list[SliceToCheck]]) -> str:
    """One line for a person: which slices to check first, per label."""
    parts = [f"{name}: slices {', '.join(str(p.slice) for p in items)}" for name, items in picks.items() if items]
    return "Check first: " + "; ".join(parts) if parts else "Nothing to check: no propagated slices."


def object_score_entropy(scores: list[float]) -> float:
    """Mean binary entropy (bits) of SAM2's object-presence probability: 1 = coin flip, 0 = certain."""
    p = torch.sigmoid(torch.tensor(scores, dtype=torch.float64)).clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log2()) - (1 - p) * (1 - p).log2()).mean())


def mask_ambiguity(logits: Sequence[torch.Tensor], margin: float = 2.0) -> float:
    """How much of what SAM2 outlines it is unsure of, in [0, 1]: per slice, the share of its outline (mask logits
    above ``-margin``) whose logit lies within ``margin`` of the decision boundary (probability 0.12-0.88 for 2),
    averaged over the slices that have an outline (0.0 when none has). A share, so large and small objects score
    alike; unlike the slice-to-slice change it does not mistake an object that moves or changes size for doubt."""
    shares = []
    for lg in logits:
        outline = lg > -margin
        size = int(outline.sum())
        if size:
            shares.append(int((outline & (lg < margin)).sum()) / size)
    return float(np.mean(shares)) if shares else 0.0


def mask_instability(masks: Sequence[np.ndarray]) -> float:
    """Mean 1 - IoU between the masks of consecutive slices (0.0 for both empty), in [0, 1]."""
    changes = []
    for a, b in zip(masks, masks[1:], strict=False):
        union = np.logical_or(a, b).sum()
        changes.append(0.0 if union == 0 else 1.0 - np.logical_and(a, b).sum() / union)
    return float(np.mean(changes)) if changes else 0.0


def propagation_uncertainty(session: VolumeSession, half_span: int = 8, box_fraction: float = 0.5) -> float:
    """How unsure the model is about a study, in [0, 1]: prompt a central box on the middle slice, propagate
    ``half_span`` slices each way, and average three signals of that propagation: SAM2's object-score entropy, the
    ambiguity of its masks' logits (:func:`mask_ambiguity`) and the masks' slice-to-slice instability.

    The ambiguity term was added after ``bench/active_learning_loop.py`` showed the first version (entropy and
    instability only) ranking correct studies with moving objects above wrongly segmented ones; see
    docs/training.md (Active learning, simulated)."""
    n, rows, cols = session.frames.shape
    key = n // 2
    mx, my = cols * (1 - box_fraction) / 2, rows * (1 - box_fraction) / 2
    prompt = KeySlicePrompt("probe", 1, key, box=(mx, my, cols - 1 - mx, rows - 1 - my))
    result = propagate_volume(session, [prompt], (max(0, key - half_span), min(n - 1, key + half_span)))
    scores = [result.object_scores["probe"][f] for f in sorted(result.object_scores["probe"])]
    frames = sorted(result.logits["probe"])
    logits = [result.logits["probe"][f].float().cpu() for f in frames]
    instability = mask_instability([(lg > 0).numpy() for lg in logits])
    return (object_score_entropy(scores) + mask_ambiguity(logits) + instability) / 3
