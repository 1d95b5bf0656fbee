"""Where to look after a propagation: per-slice confidence from SAM2's own signals, and the slices most
worth an annotator's check (lowest confidence, or a mask that changes sharply from its neighbour)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .propagation import PropagationResult


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
