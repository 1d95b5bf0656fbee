"""The interactive protocol of the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image
Segmentation" (its evaluation script CVPR25_iter_eval.py), run against this app's 3D requests:

1. one box per object: on the middle slice of the object's extent along the slice axis, with that extent (the
   challenge's 3D box: ``z_min``, ``z_max``, and a 2D box on ``z_mid``) sent as ``slice_range``;
2. then up to five clicks per object, each at the centre of the largest remaining error region: the largest
   26-connected component of (answer != truth) for that object, its centre the voxel farthest from the component's
   border (Euclidean distance transform; ties broken by a generator seeded with 42 at every click, as there); a
   foreground click where the answer missed, a background click where it overshot; all objects' clicks go in one
   ``correction`` request.

After each of the six answers: Dice and NSD (2 mm) averaged over the objects (NSD counted as 0 when that mean Dice is
at most 0.2, as the challenge does), and the seconds the answer took. Per case: Dice AUC and NSD AUC (trapezoids over
the five click steps, x = 0..4, as the challenge computes them: at most 4), final Dice and NSD.

The protocol talks to the model through ``ask(params) -> label map`` (the request body of ``medsam2_3d`` in the
native prompt form, see docs/prompts.md): bench/interactive_protocol.py sends it to the real server over REST, the
fast test to the app's segmenter in the process. No MONAI Label imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from lib.training.metrics import dice_score, nsd_score

Ask = Callable[[dict], np.ndarray]  # a medsam2_3d request body -> the answered label map (k, j, i)

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
# how a click step reaches the app: ``correction`` adds the clicks to the objects' key slices and propagates each
# object again from all of them (docs/engine.md#corrections); ``refine`` refines the last answer on the clicked
# slices only, the answer there going in as the mask the decoder refines (docs/prompts.md#refining-an-existing-label)
CLICKS_AS = {"correction": {"correction": True}, "refine": {"refine_from": "last"}}


@dataclass(frozen=True)
class ProtocolSettings:
    """The challenge's constants."""

    clicks: int = 5
    nsd_tolerance_mm: float = 2.0
    nsd_min_dice: float = 0.2  # NSD is computed only above this mean Dice (else 0)
    tie_seed: int = 42


@dataclass(frozen=True)
class Click:
    """One simulated click on voxel (k, j, i) of an object; ``foreground`` where the answer missed it."""

    value: int
    k: int
    j: int
    i: int
    foreground: bool


@dataclass
class CaseResult:
    """The protocol on one case: per step (box, then each click step) Dice, NSD and seconds."""

    case: str
    objects: int
    dice: list[float] = field(default_factory=list)
    nsd: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    clicks: list[list[Click]] = field(default_factory=list)

    def summary(self, settings: ProtocolSettings = ProtocolSettings()) -> dict:
        """The challenge's five figures (and the curves they come from)."""
        return {
            "case": self.case,
            "objects": self.objects,
            "dice_auc": round(area_under_curve(self.dice, settings.clicks), 4),
            "nsd_auc": round(area_under_curve(self.nsd, settings.clicks), 4),
            "final_dice": round(self.dice[-1], 4),
            "final_nsd": round(self.nsd[-1], 4),
            "seconds_per_interaction": round(float(np.mean(self.seconds)), 3),
            "dice_per_step": [round(d, 4) for d in self.dice],
            "nsd_per_step": [round(n, 4) for n in self.nsd],
            "seconds_per_step": [round(s, 3) for s in self.seconds],
            "foreground_clicks": sum(c.foreground for step in self.clicks for c in step),
            "background_clicks": sum(not c.foreground for step in self.clicks for c in step),
        }


def area_under_curve(values: Sequence[float], clicks: int = 5) -> float:
    """The challenge's AUC: trapezoids over the last ``clicks`` steps (the clicks; the box is not counted), x = 0, 1,
    ...; between 0 and ``clicks`` - 1."""
    tail = np.asarray(values[-clicks:], dtype=float)
    return float(np.sum((tail[1:] + tail[:-1]) / 2)) if tail.size > 1 else 0.0


def box_prompt(label: np.ndarray, value: int, name: str) -> tuple[dict, list[int]]:
    """The challenge's box for object ``value``: a tight 2D box on the middle slice of its extent (the nearest slice
    holding it, when the object skips that one) and the extent [z_min, z_max] as the request's ``slice_range``."""
    mask = label == value
    present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    first, last = int(present[0]), int(present[-1])
    middle = (first + last) // 2
    k = int(present[np.argmin(np.abs(present - middle))])
    ys, xs = np.nonzero(mask[k])
    box = [float(xs.min()), float(ys.min()), float(max(xs.max(), xs.min() + 1)), float(max(ys.max(), ys.min() + 1))]
    return {"label": name, "slice": k, "box": box}, [first, last]


def _centre_of(component: np.ndarray, rng: np.random.RandomState) -> tuple[int, int, int]:
    """The voxel of ``component`` farthest from its border (the volume's edge does not count as border: it is
    padded, as the challenge pads its crop); ties drawn uniformly."""
    lo = np.argwhere(component).min(axis=0)
    hi = np.argwhere(component).max(axis=0) + 1
    crop = component[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pad = np.maximum((np.array(crop.shape) * 0.25).astype(int), 1)
    depth = ndimage.distance_transform_edt(np.pad(crop, [(p, p) for p in pad]))
    depth = depth[pad[0] : pad[0] + crop.shape[0], pad[1] : pad[1] + crop.shape[1], pad[2] : pad[2] + crop.shape[2]]
    best = np.argwhere(depth == depth.max())
    k, j, i = best[rng.choice(len(best))] + lo
    return int(k), int(j), int(i)


def next_click(answer: np.ndarray, truth: np.ndarray, value: int, seed: int = 42) -> Click | None:
    """The click a challenge annotator places on object ``value`` of ``truth`` given ``answer`` (label maps):
    at the centre of the largest 26-connected error component; None when the answer has no error."""
    error = (answer == value) != (truth == value)
    if not error.any():
        return None
    components, count = ndimage.label(error, structure=CONNECTIVITY_26)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    k, j, i = _centre_of(components == int(sizes.argmax()), np.random.RandomState(seed))
    return Click(value, k, j, i, bool(truth[k, j, i] == value))


def click_prompt(click: Click, name: str) -> dict:
    """A click as a native prompt of ``medsam2_3d`` (axial pixels: x = i, y = j)."""
    return {"label": name, "slice": click.k, ("foreground" if click.foreground else "background"): [[click.i, click.j]]}


def scores(
    answer: np.ndarray, truth: np.ndarray, values: Sequence[int], spacing_kji, settings: ProtocolSettings
) -> tuple[float, float]:
    """(Dice, NSD) averaged over the objects, as the challenge: NSD 0 unless the mean Dice exceeds 0.2."""
    dice = float(np.mean([dice_score(answer == v, truth == v) for v in values]))
    if dice <= settings.nsd_min_dice:
        return dice, 0.0
    nsd = [nsd_score(answer == v, truth == v, spacing_kji, settings.nsd_tolerance_mm) for v in values]
    return dice, float(np.mean(nsd))


def _timed(ask: Ask, params: dict) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    answer = ask(params)
    return answer, time.perf_counter() - start


def run_case(
    ask: Ask,
    truth: np.ndarray,
    spacing_kji: Sequence[float],
    names: dict[int, str],
    case: str = "",
    settings: ProtocolSettings = ProtocolSettings(),
    clicks_as: str = "correction",
) -> CaseResult:
    """The protocol on one labelled volume: box step (one request per object, each with its own extent as
    ``slice_range``; the step's seconds are their sum), then ``settings.clicks`` click steps (one ``correction``
    request with every object's click). ``names`` maps each label value of ``truth`` to the label name the server
    knows it by. A click step where no object has an error left repeats the last answer (0 s)."""
    values = [int(v) for v in np.unique(truth) if v != 0]
    result = CaseResult(case, len(values))
    answer, spent = np.zeros_like(truth), 0.0
    for n, value in enumerate(values):
        prompt, extent = box_prompt(truth, value, names[value])
        answer, seconds = _timed(ask, {"prompts": [prompt], "slice_range": extent, "reset_state": n == 0})
        spent += seconds
    _record(result, answer, truth, values, spacing_kji, settings, spent, [])
    for _ in range(settings.clicks):
        clicks = [c for v in values if (c := next_click(answer, truth, v, settings.tie_seed)) is not None]
        seconds = 0.0
        if clicks:
            params = {"prompts": [click_prompt(c, names[c.value]) for c in clicks], **CLICKS_AS[clicks_as]}
            answer, seconds = _timed(ask, params)
        _record(result, answer, truth, values, spacing_kji, settings, seconds, clicks)
    return result


def _record(
    result: CaseResult,
    answer: np.ndarray,
    truth: np.ndarray,
    values: Sequence[int],
    spacing_kji: Sequence[float],
    settings: ProtocolSettings,
    seconds: float,
    clicks: list[Click],
) -> None:
    dice, nsd = scores(answer, truth, values, spacing_kji, settings)
    result.dice.append(dice)
    result.nsd.append(nsd)
    result.seconds.append(seconds)
    result.clicks.append(clicks)


def summarise(results: Sequence[CaseResult], settings: ProtocolSettings = ProtocolSettings()) -> dict:
    """Means over the cases (and their standard deviation) of the challenge's figures."""
    rows = [r.summary(settings) for r in results]
    out: dict = {"cases": len(rows)}
    if not rows:
        return out
    for key in ("dice_auc", "nsd_auc", "final_dice", "final_nsd", "seconds_per_interaction"):
        values = [row[key] for row in rows]
        out[key] = round(float(np.mean(values)), 4)
        out[f"{key}_sd"] = round(float(np.std(values)), 4)
    steps = np.array([r.dice for r in results])
    out["dice_per_step"] = [round(float(x), 4) for x in steps.mean(axis=0)]
    return out
