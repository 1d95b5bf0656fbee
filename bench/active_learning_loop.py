"""Active learning, simulated: which unlabelled study should an annotator label next?

A pool of generated volumes of varied difficulty, a held-out test set from the same mixture, and a tiny starting
labelled set. Each cycle a strategy picks ``per_cycle`` studies; a simulated annotator segments each one the way a
user does with this app (a box on the object's largest slice, 3D propagation through the engine, then correction
prompts on the worst slices through the engine's follow-up path, ``correction: true`` in the same session), counts
its corrections and saves the ground truth as the final label. Then the model is retrained from its current weights
on every label so far (a fixed, small number of steps) and the held-out Dice is measured with the trainer's own
validation (:func:`lib.training.validation.evaluate`: a box on each object's largest slice, propagated).

Strategies:
- ``uncertainty``: this app's server strategy, :class:`lib.activelearning.uncertainty.PropagationUncertainty`,
  called as MONAI Label calls it (``strategy(request, datastore)``) on every unlabelled study;
- ``random``: a uniformly random unlabelled study from a generator seeded per run;
- ``monai_first`` and ``monai_random``: MONAI Label's own ``First`` and ``Random`` classes, called the same way.
  Random weighs each study by ``now - ts`` of its last selection; nothing in MONAI Label 0.8 records that ``ts``,
  so all weights are equal and it is uniform, drawn from Python's global ``random`` (seeded per run).
- ``oracle`` (a reference, not a strategy anyone can run): the study the current model segments worst, by its
  true Dice; the most an error-ranking strategy could gain here.
The strategies are called through :class:`InMemoryDatastore`, a stand-in for the Datastore methods they use.

The pool (see :func:`generate_case`): one labelled object per 16 x 48 x 48 volume in noisy soft tissue, five kinds
in fixed shares: ``plain`` (a third: a bright ellipsoid) and, a sixth each, ``faint`` (the same at a third of the
contrast), ``small`` (a 3 px ellipsoid), ``neighbour`` (a brighter unlabelled ellipsoid touching it) and
``drifting`` (a tube whose in-plane position moves along the slices). The test set has the same shares. The base
model is pretrained once on generic studies (one ellipsoid of random size and contrast, none of the pool's studies)
and cached; each seed then fine-tunes it on its starting set (two studies drawn at random from the pool), and every
strategy of that seed starts from that model, that set and that test set (paired comparisons). Fine-tuning keeps
the image encoder frozen (the app's default), so each study's encoder outputs are computed once and shared by all
sessions (:class:`FrozenEncoderFeatures`, checked against the encoder's weights after every retraining).

    python bench/active_learning_loop.py --out bench/results/active_learning_cpu.jsonl         # CPU, ~25 min
    python bench/active_learning_loop.py --seeds 0 --cycles 2 --pool 12 --test 6               # a smoke run
    python bench/active_learning_loop.py --table bench/results/active_learning_cpu.jsonl       # the tables
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from common import REPO, JsonLines, device_name, dtype_name, loadavg, use_repo_paths
from scipy import ndimage

use_repo_paths()

from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402

from lib.activelearning.uncertainty import PropagationUncertainty  # noqa: E402
from lib.engine.checkpoints import (  # noqa: E402
    MEDSAM2_CONFIG,
    build_model,
    image_size_overrides,
    load_model,
    resolve_checkpoint,
)
from lib.engine.confidence import propagation_uncertainty  # noqa: E402
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.engine.preprocessing import parse_window  # noqa: E402
from lib.engine.prompts import LabelMap  # noqa: E402
from lib.engine.propagation import propagate_volume  # noqa: E402
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings  # noqa: E402
from lib.engine.volume_session import SessionCache, VolumeSession  # noqa: E402
from lib.training.data import Study  # noqa: E402
from lib.training.loop import train  # noqa: E402
from lib.training.metrics import dice_score  # noqa: E402
from lib.training.settings import TrainSettings  # noqa: E402
from lib.training.validation import evaluate, key_slice_prompts  # noqa: E402

LABEL = "object"
SPACING = (2.0, 1.0, 1.0)
IDENTITY_WINDOW = "127.5,255"  # uint8 volumes are served as they are (level 127.5, width 255: 0..255 -> 0..255)
KINDS = ("plain", "plain", "faint", "small", "neighbour", "drifting")  # the pool's shares: plain 1/3, others 1/6
STRATEGIES = ("uncertainty", "random", "monai_first", "monai_random")
SEGMENTER_FEATURE_DTYPE = SegmenterSettings.feature_dtype  # what the server's sessions keep the encoder outputs in


# --- data ----------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A generated study and what kind of case it is."""

    study: Study
    kind: str

    @property
    def name(self) -> str:
        return self.study.name


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")


def _ellipsoid(grid, centre, radii) -> np.ndarray:
    k, j, i = grid
    return ((k - centre[0]) / radii[0]) ** 2 + ((j - centre[1]) / radii[1]) ** 2 + (
        (i - centre[2]) / radii[2]
    ) ** 2 <= 1


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Uniform in [low, high]; the middle when the range is empty (volumes too small for the object)."""
    return float(rng.uniform(low, high)) if high > low else (low + high) / 2


def _centre(rng: np.random.Generator, shape, radii, margin: float = 1.5) -> tuple[float, float, float]:
    return tuple(_uniform(rng, r + margin, s - 1 - r - margin) for s, r in zip(shape, radii, strict=True))


def generate_case(name: str, kind: str, seed: int, shape: tuple[int, int, int] = (16, 48, 48)) -> Case:
    """One study: noisy soft tissue (mean 60, sd 25, uint8) and one labelled object of the given kind.

    ``plain``: an ellipsoid, in-plane radii 6-9 px, 3-5 slices half-length, +90..+120 brighter;
    ``faint``: the same geometry at +30..+42 (contrast-to-noise about 1.4);
    ``small``: in-plane radii 2.5-3.5 px, 1.5-2.5 slices half-length, +90..+120;
    ``neighbour``: a plain object and, touching it in-plane, an unlabelled ellipsoid +130..+160 that covers the
    same slices (the box must tell them apart);
    ``drifting``: a tube, radius 4-5.5 px, over 9-13 slices, whose centre moves 1.2-2 px per slice in-plane.
    """
    if kind not in set(KINDS) | {"generic"}:
        raise ValueError(f"unknown kind {kind!r}")
    rng = np.random.default_rng(seed)
    n, h, w = shape
    grid = _grid(shape)
    image = rng.normal(60, 25, shape)
    label = np.zeros(shape, np.uint8)
    if kind in ("plain", "faint", "neighbour"):
        radii = (rng.uniform(3, 5), rng.uniform(6, 9), rng.uniform(6, 9))
        if kind == "neighbour":  # room for the neighbour on one side
            radii = (radii[0], min(radii[1], 0.2 * h), min(radii[2], 0.2 * w))
        centre = _centre(rng, shape, radii)
        inside = _ellipsoid(grid, centre, radii)
        contrast = rng.uniform(30, 42) if kind == "faint" else rng.uniform(90, 120)
        if kind == "neighbour":
            other_r = (radii[0] * rng.uniform(0.9, 1.2), rng.uniform(5, 8), rng.uniform(5, 8))
            angle = rng.uniform(0, 2 * np.pi)
            dist = 0.9 * (np.hypot(radii[1] * np.sin(angle), radii[2] * np.cos(angle)) + other_r[1])
            other_c = (centre[0], centre[1] + dist * np.sin(angle), centre[2] + dist * np.cos(angle))
            other = _ellipsoid(grid, other_c, other_r) & ~inside
            image[other] += rng.uniform(130, 160)
        image[inside] += contrast
        label[inside] = 1
    elif kind == "small":
        radii = (rng.uniform(1.5, 2.5), rng.uniform(2.5, 3.5), rng.uniform(2.5, 3.5))
        inside = _ellipsoid(grid, _centre(rng, shape, radii, margin=4), radii)
        image[inside] += rng.uniform(90, 120)
        label[inside] = 1
    elif kind == "drifting":
        length = min(int(rng.integers(9, 14)), n - 2)
        k0 = int(rng.integers(1, n - length))
        radius = rng.uniform(4, 5.5)
        step = rng.uniform(1.2, 2.0)
        angle = rng.uniform(0, 2 * np.pi)
        travel = step * (length - 1)
        dj, di = travel * np.sin(angle), travel * np.cos(angle)
        start_j = _uniform(rng, radius + 2 + max(0, -dj), h - radius - 3 - max(0, dj))
        start_i = _uniform(rng, radius + 2 + max(0, -di), w - radius - 3 - max(0, di))
        contrast = rng.uniform(90, 120)
        _, jj, ii = grid
        for t in range(length):
            f = t / (length - 1)
            disc = (jj[0] - (start_j + f * dj)) ** 2 + (ii[0] - (start_i + f * di)) ** 2 <= radius**2
            image[k0 + t][disc] += contrast
            label[k0 + t][disc] = 1
    else:  # generic: the pretraining data, one ellipsoid of random size and contrast
        radii = (rng.uniform(2.5, 6), rng.uniform(4, 10), rng.uniform(4, 10))
        inside = _ellipsoid(grid, _centre(rng, shape, radii), radii)
        image[inside] += rng.uniform(50, 130)
        label[inside] = 1
    frames = np.clip(image, 0, 255).astype(np.uint8)
    return Case(Study(name, frames, label, SPACING), kind)


def make_cases(prefix: str, count: int, seed: int, shape: tuple[int, int, int]) -> list[Case]:
    """``count`` cases in the fixed shares of :data:`KINDS` (whole repeats first, then the first kinds), in an
    order shuffled by ``seed``; named ``<prefix>000``, ``<prefix>001``, ... in that order."""
    kinds = [KINDS[i % len(KINDS)] for i in range(count)]
    order = np.random.default_rng(seed).permutation(count)
    return [generate_case(f"{prefix}{n:03d}", kinds[idx], seed * 100_003 + n, shape) for n, idx in enumerate(order)]


def write_volumes(cases: Sequence[Case], folder: Path) -> dict[str, str]:
    """Each case's image as NIfTI (what the engine's sessions read); returns id -> path."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in cases:
        image = sitk.GetImageFromArray(case.study.frames)
        image.SetSpacing(tuple(float(s) for s in reversed(case.study.spacing_kji)))
        path = folder / f"{case.name}.nii.gz"
        sitk.WriteImage(image, str(path))
        paths[case.name] = str(path)
    return paths


# --- the app's pieces, in memory -----------------------------------------------------------------------------------


class InMemoryDatastore:
    """The part of MONAI Label's Datastore that the strategies call (unlabelled ids, image info and URI), plus the
    final labels the simulated annotator saves."""

    def __init__(self, uris: dict[str, str]):
        self._uris = dict(uris)
        self._info: dict[str, dict] = {i: {} for i in uris}
        self.final: dict[str, np.ndarray] = {}

    def get_unlabeled_images(self, label_tag: str | None = None, labels: Sequence[str] | None = None) -> list[str]:
        return [i for i in self._uris if i not in self.final]

    def get_labeled_images(self, label_tag: str | None = None, labels: Sequence[str] | None = None) -> list[str]:
        return [i for i in self._uris if i in self.final]

    def get_image_uri(self, image_id: str) -> str:
        return self._uris[image_id]

    def get_image_info(self, image_id: str) -> dict:
        return dict(self._info[image_id])

    def save_final(self, image_id: str, label: np.ndarray) -> None:
        if image_id in self.final:
            raise ValueError(f"{image_id} already has a final label")
        self.final[image_id] = label.copy()


class BenchModelProvider:
    """What the segmenter and the strategy read from :class:`lib.engine.model_provider.ModelProvider`: the model
    and a version, bumped after every retraining (the strategy caches its scores per version)."""

    checkpoint = SimpleNamespace(name="active-learning-bench", is_random=False)

    def __init__(self, model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype | None):
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        self.version = 1

    def get(self) -> tuple[torch.nn.Module, int]:
        return self.model, self.version

    def bump(self) -> None:
        self.version += 1


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the image encoder's weights."""
    digest = hashlib.sha1()
    for name, p in model.named_parameters():
        if name.startswith("image_encoder."):
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class FrozenEncoderFeatures:
    """Each study's image-encoder outputs, computed once and shared by every session of the bench: valid while the
    encoder's weights do not change (fine-tuning with ``train_parts`` ``no_image_encoder``, the app's default).
    The encoder is checked against its fingerprint after every retraining (:meth:`check`)."""

    def __init__(self, model: torch.nn.Module):
        self.fingerprint = encoder_fingerprint(model)
        self._cached: dict[str, tuple[dict, Any, Any]] = {}

    def check(self, model: torch.nn.Module) -> None:
        if encoder_fingerprint(model) != self.fingerprint:
            raise RuntimeError("the image encoder changed: cached features are stale (train_parts must freeze it)")

    def seed(self, key: str, volume: VolumeSession) -> None:
        """Give ``volume`` the cached features of ``key`` in its feature dtype (encoding them the first time)."""
        key = f"{key}|{volume.feature_dtype}"
        cached = self._cached.get(key)
        if cached is None:
            volume.encode(range(volume.num_slices))
            self._cached[key] = (dict(volume._features), volume._pos_enc, volume._feat_sizes)
            return
        features, pos_enc, feat_sizes = cached
        volume._features.update(features)
        volume._pos_enc, volume._feat_sizes = pos_enc, feat_sizes


class BenchSegmenter(MedSAM2Segmenter):
    """The app's segmenter (sessions, corrections, undo) on generated volumes, with encoder features shared across
    sessions when ``features`` is given."""

    def __init__(self, provider: BenchModelProvider, features: FrozenEncoderFeatures | None = None):
        settings = SegmenterSettings(window=parse_window(IDENTITY_WINDOW), labels=LabelMap({LABEL: 1}))
        super().__init__(provider, settings, SessionCache(max_sessions=2, max_bytes=1 << 30))
        self.features = features

    def open_image(self, image_path, axis, model, timings=None):
        session = super().open_image(image_path, axis, model, timings)
        if self.features is not None:
            self.features.seed(image_path, session.volume)
        return session


# --- the simulated annotator ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotatorSettings:
    """When a slice needs a correction: Dice below ``threshold`` and at least ``min_error_px`` wrong pixels.
    A slice whose Dice is below ``box_below`` (or empty where the object is) gets a box; others a click."""

    threshold: float = 0.8
    min_error_px: int = 4
    box_below: float = 0.2
    max_corrections: int = 4


@dataclass
class Annotation:
    """One annotated case: the corrections it took and the Dice of the model's answers before and after them."""

    case: str
    kind: str
    corrections: int
    clicks: int
    boxes: int
    corrected_slices: list[int]
    key_slices: int  # the label's key slices in the session after the last answer: the box's and the corrections'
    dice_first: float
    dice_corrected: float
    seconds: float


def slice_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per slice (axis 0) Dice; 1.0 where both are empty."""
    inter = (pred & truth).reshape(len(pred), -1).sum(1)
    total = pred.reshape(len(pred), -1).sum(1) + truth.reshape(len(truth), -1).sum(1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def worst_slice(
    pred: np.ndarray, truth: np.ndarray, settings: AnnotatorSettings, corrected: Sequence[int] = ()
) -> int | None:
    """The slice a user fixes next (None: nothing to fix): among the slices that need a correction, the one with
    the most wrong pixels, preferring slices not corrected yet."""
    dice = slice_dice(pred, truth)
    errors = (pred ^ truth).reshape(len(pred), -1).sum(1)
    bad = np.flatnonzero((dice < settings.threshold) & (errors >= settings.min_error_px))
    if bad.size == 0:
        return None
    done = set(corrected)
    return int(min(bad, key=lambda k: (int(k) in done, -errors[k], dice[k], k)))


def _interior_point(region: np.ndarray) -> tuple[float, float]:
    """(x, y) of the pixel of ``region`` farthest from its border: where a user clicks into an error."""
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), region.shape)
    return float(x), float(y)


def correction_prompt(pred: np.ndarray, truth: np.ndarray, index: int, settings: AnnotatorSettings) -> dict:
    """A correction on one slice (2D masks): a box around the truth when the answer there is empty or mostly
    wrong, else a click in the larger error region (foreground where it missed, background where it overshot)."""
    dice = float(slice_dice(pred[None], truth[None])[0])
    prompt: dict[str, Any] = {"label": LABEL, "slice": index}
    if truth.any() and (not pred.any() or dice < settings.box_below):
        ys, xs = np.nonzero(truth)
        prompt["box"] = [
            float(xs.min()),
            float(ys.min()),
            float(max(xs.max(), xs.min() + 1)),
            float(max(ys.max(), ys.min() + 1)),
        ]
        return prompt
    missed, extra = truth & ~pred, pred & ~truth
    if missed.sum() >= extra.sum():
        prompt["foreground"] = [list(_interior_point(missed))]
    else:
        prompt["background"] = [list(_interior_point(extra))]
    return prompt


def annotate(
    segmenter: MedSAM2Segmenter,
    image_path: str,
    case: Case,
    client_id: str,
    settings: AnnotatorSettings,
) -> Annotation:
    """Segment ``case`` as a user does: a box on the object's largest slice (as the validation prompts), 3D
    propagation, then corrections on the worst slice in the same session (``correction: true``: the engine adds
    the slice to the label's key slices and propagates again from all of them) until no slice needs one or the cap
    is reached."""
    t0 = time.perf_counter()
    truth = case.study.label > 0
    box = key_slice_prompts(case.study.label)[0]
    first = {"prompts": [{"label": LABEL, "slice": box.slice_index, "box": list(box.box)}], "client_id": client_id}
    label, out, _ = segmenter.segment_3d(image_path, first)
    pred = label > 0
    dice_first = dice_score(pred, truth)
    clicks = boxes = 0
    corrected: list[int] = []
    while clicks + boxes < settings.max_corrections:
        index = worst_slice(pred, truth, settings, corrected)
        if index is None:
            break
        prompt = correction_prompt(pred[index], truth[index], index, settings)
        boxes += "box" in prompt
        clicks += "box" not in prompt
        corrected.append(index)
        fix = {"prompts": [prompt], "correction": True, "client_id": client_id}
        label, out, _ = segmenter.segment_3d(image_path, fix)
        if out.get("warnings"):
            raise RuntimeError(f"the correction lost its session: {out['warnings']}")
        pred = label > 0
    return Annotation(
        case.name,
        case.kind,
        clicks + boxes,
        clicks,
        boxes,
        corrected,
        len(out["prompts_in_session"]),
        round(dice_first, 4),
        round(dice_score(pred, truth), 4),
        round(time.perf_counter() - t0, 2),
    )


# --- strategies ----------------------------------------------------------------------------------------------------


@dataclass
class Pick:
    """A strategy's choice, and (uncertainty) the scores it chose from."""

    case: str
    scores: dict[str, float] = field(default_factory=dict)


def make_strategy(
    name: str, segmenter: BenchSegmenter, seed: int, pool_size: int, truths: dict[str, np.ndarray] | None = None
) -> Callable[[InMemoryDatastore], Pick]:
    """The strategy ``name`` as a function of the datastore. The global ``random`` is seeded here: MONAI Label's
    Random draws from it (and the app's strategy shuffles its candidates with it). ``oracle`` needs ``truths``."""
    random.seed(seed)
    request = {"strategy": name}
    if name == "oracle":
        if truths is None:
            raise ValueError("the oracle needs the true labels")
        cache: dict[tuple[int, str], float] = {}
        return lambda datastore: _oracle_pick(segmenter, datastore, truths, cache)
    if name == "uncertainty":
        strategy = PropagationUncertainty(segmenter, max_candidates=pool_size)

        def pick(datastore: InMemoryDatastore) -> Pick:
            out = strategy(request, datastore)
            _, version = segmenter.provider.get()
            uri_to_id = {datastore.get_image_uri(i): i for i in datastore.get_unlabeled_images()}
            scores = {uri_to_id[u]: s for (u, v), s in strategy._scores.items() if v == version and u in uri_to_id}
            return Pick(out["id"], scores)

        return pick
    if name == "random":
        rng = np.random.default_rng(seed)

        def pick_random(datastore: InMemoryDatastore) -> Pick:
            candidates = sorted(datastore.get_unlabeled_images())
            return Pick(candidates[int(rng.integers(len(candidates)))])

        return pick_random
    if name in ("monai_first", "monai_random"):
        strategy = First() if name == "monai_first" else Random()
        return lambda datastore: Pick(strategy(request, datastore)["id"])
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join((*STRATEGIES, 'oracle'))}")


def _oracle_pick(
    segmenter: BenchSegmenter,
    datastore: InMemoryDatastore,
    truths: dict[str, np.ndarray],
    cache: dict[tuple[int, str], float],
) -> Pick:
    """A reference no real strategy can reach: the unlabelled study on which the current model is worst, by its
    true propagated Dice from a box on the largest slice (what the validation measures). Scores are 1 - Dice,
    cached per model version."""
    model, version = segmenter.provider.get()
    scores = {}
    for image_id in sorted(datastore.get_unlabeled_images()):
        if (version, image_id) not in cache:
            session = segmenter.open_image(datastore.get_image_uri(image_id), axis=2, model=model)
            truth = truths[image_id]
            result = propagate_volume(session.volume, key_slice_prompts(truth))
            cache[version, image_id] = 1.0 - dice_score(result.binary_mask("1"), truth > 0)
        scores[image_id] = cache[version, image_id]
    return Pick(max(scores, key=lambda i: (scores[i], i)), scores)


# --- training and evaluation ---------------------------------------------------------------------------------------


def train_settings(steps: int, epochs: int, lr: float, seed: int, clip_length: int = 6, **extra) -> TrainSettings:
    """A short, fixed fine-tuning budget: ``epochs`` x ``steps`` clips of one object, one clip per optimiser step,
    the image encoder frozen (the app's default ``train_parts``), no early stop. Fields the trainer does not have
    (older or newer versions) are left out."""
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    wanted = {
        "epochs": epochs,
        "steps_per_epoch": steps,
        "clip_length": clip_length,
        "max_objects": 1,
        "lr": lr,
        "grad_clip": 1.0,
        "train_parts": "no_image_encoder",
        "seed": seed,
        "clips_per_step": 1,
        "patience": 0,
        **extra,
    }
    return TrainSettings(**{k: v for k, v in wanted.items() if k in names})


def retrain(model: torch.nn.Module, studies: Sequence[Study], settings: TrainSettings, device, dtype) -> float:
    """Fine-tune ``model`` in place on ``studies`` (no validation set: the bench measures held-out Dice itself);
    returns the mean training loss of the last epoch."""
    result = train(model, list(studies), [], settings, device, dtype, lambda m, r: None)
    model.eval()
    return float(result.epochs[-1].train_loss) if result.epochs else float("nan")


def held_out_dice(model: torch.nn.Module, cases: Sequence[Case], device, dtype) -> dict:
    """The trainer's validation (:func:`evaluate`) on the test set: overall and per kind."""
    by_kind: dict[str, float] = {}
    weighted = 0.0
    for kind in sorted({c.kind for c in cases}):
        group = [c.study for c in cases if c.kind == kind]
        scores = evaluate(model, group, device, dtype, 2.0)
        by_kind[kind] = round(scores["dice"], 4)
        weighted += scores["dice"] * len(group)
    return {"dice": round(weighted / max(len(cases), 1), 4), "dice_by_kind": by_kind}


def trainable_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the weights outside the image encoder (what fine-tuning changes)."""
    digest = hashlib.sha1()
    for name, p in model.named_parameters():
        if not name.startswith("image_encoder."):
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# --- the loop ------------------------------------------------------------------------------------------------------


@dataclass
class LoopConfig:
    """One run's sizes and budgets."""

    pool: int = 24
    test: int = 12
    start: int = 2
    per_cycle: int = 3
    cycles: int = 3
    shape: tuple[int, int, int] = (16, 48, 48)
    steps: int = 6  # clips per retraining epoch
    epochs: int = 2
    start_steps: int = 12  # the seed's first fine-tuning, on the starting set
    lr: float = 1e-4
    clip_length: int = 4
    loss: str = "sam2"  # the retraining loss (the reference model was trained with dice_ce)
    annotator: AnnotatorSettings = field(default_factory=AnnotatorSettings)


@dataclass
class SeedStart:
    """What every strategy of a seed starts from: the data, the starting labels and the model tuned on them."""

    seed: int
    pool: list[Case]
    test: list[Case]
    uris: dict[str, str]
    start_ids: list[str]
    model: torch.nn.Module
    start_scores: dict


@dataclass
class Cycle:
    """One cycle of one run."""

    cycle: int
    labels: int
    picks: list[Pick]
    annotations: list[Annotation]
    dice: float
    dice_by_kind: dict
    train_loss: float | None
    weights_changed: bool
    seconds: float
    phase_seconds: dict = field(default_factory=dict)


@dataclass
class RunResult:
    strategy: str
    seed: int
    cycles: list[Cycle]
    datastore: InMemoryDatastore
    model: torch.nn.Module


def prepare_seed(
    seed: int, base: torch.nn.Module, config: LoopConfig, folder: Path, device, dtype, features=None
) -> SeedStart:
    """The seed's pool and test set, its starting labelled set (drawn at random from the pool), and the base model
    fine-tuned on it (in a copy), with its held-out Dice."""
    pool = make_cases("case", config.pool, seed, config.shape)
    test = make_cases("test", config.test, 10_000 + seed, config.shape)
    uris = write_volumes(pool, folder / f"seed{seed}")
    rng = np.random.default_rng(seed)
    start_ids = sorted(str(i) for i in rng.choice(sorted(uris), size=config.start, replace=False))
    model = copy.deepcopy(base)
    if config.start_steps > 0:
        studies = [c.study for c in pool if c.name in start_ids]
        settings = train_settings(config.start_steps, 1, config.lr, seed, config.clip_length, loss=config.loss)
        retrain(model, studies, settings, device, dtype)
        if features is not None:
            features.check(model)
    model.eval()
    return SeedStart(seed, pool, test, uris, start_ids, model, held_out_dice(model, test, device, dtype))


def run_strategy(
    name: str,
    start: SeedStart,
    config: LoopConfig,
    device,
    dtype,
    features: FrozenEncoderFeatures | None = None,
    on_cycle: Callable[[Cycle], None] | None = None,
) -> RunResult:
    """Cycles of pick ``per_cycle`` -> annotate -> save the truth as final -> retrain on all labels -> held-out Dice."""
    model = copy.deepcopy(start.model).eval()
    provider = BenchModelProvider(model, device, dtype)
    segmenter = BenchSegmenter(provider, features)
    datastore = InMemoryDatastore(start.uris)
    cases = {c.name: c for c in start.pool}
    for case_id in start.start_ids:
        datastore.save_final(case_id, cases[case_id].study.label)
    truths = {c.name: c.study.label for c in start.pool}
    pick = make_strategy(name, segmenter, start.seed, len(start.pool), truths)
    cycles = []
    for cycle in range(1, config.cycles + 1):
        t0 = time.perf_counter()
        picks, annotations, timings = [], [], {"pick": 0.0, "annotate": 0.0}
        for n in range(config.per_cycle):
            if not datastore.get_unlabeled_images():
                break
            t = time.perf_counter()
            chosen = pick(datastore)
            timings["pick"] += time.perf_counter() - t
            case = cases[chosen.case]
            client = f"{name}-s{start.seed}-c{cycle}-{n}"
            annotations.append(annotate(segmenter, start.uris[case.name], case, client, config.annotator))
            timings["annotate"] += annotations[-1].seconds
            datastore.save_final(case.name, case.study.label)  # the corrected label is the truth
            picks.append(chosen)
        before = trainable_fingerprint(model)
        settings = train_settings(
            config.steps, config.epochs, config.lr, start.seed * 1000 + cycle, config.clip_length, loss=config.loss
        )
        labelled = [cases[i].study for i in sorted(datastore.final)]
        t = time.perf_counter()
        loss = retrain(model, labelled, settings, device, dtype)
        timings["train"] = time.perf_counter() - t
        if features is not None:
            features.check(model)
        provider.bump()
        t = time.perf_counter()
        scores = held_out_dice(model, start.test, device, dtype)
        timings["evaluate"] = time.perf_counter() - t
        record = Cycle(
            cycle,
            len(datastore.final),
            picks,
            annotations,
            scores["dice"],
            scores["dice_by_kind"],
            round(loss, 4),
            trainable_fingerprint(model) != before,
            round(time.perf_counter() - t0, 1),
            {k: round(v, 1) for k, v in timings.items()},
        )
        cycles.append(record)
        if on_cycle:
            on_cycle(record)
    return RunResult(name, start.seed, cycles, datastore, model)


# --- summaries -----------------------------------------------------------------------------------------------------


def area_under_curve(labels: Sequence[int], dice: Sequence[float]) -> float:
    """Mean Dice over the label budget: the trapezoid area under Dice vs number of labels, divided by its width."""
    x, y = np.asarray(labels, float), np.asarray(dice, float)
    width = x[-1] - x[0]
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / width) if width > 0 else float(y[-1])


def _spread(values: Sequence[float]) -> dict:
    v = np.asarray(values, float)
    return {
        "mean": round(float(v.mean()), 4),
        "sd": round(float(v.std(ddof=1)), 4) if len(v) > 1 else 0.0,
        "min": round(float(v.min()), 4),
        "max": round(float(v.max()), 4),
    }


def summarise(runs: Sequence[RunResult], starts: dict[int, SeedStart]) -> dict:
    """Per strategy over seeds: AUC of Dice vs labels (from the starting set), final Dice, corrections per case."""
    aucs, finals, corrections, per_seed = [], [], [], {}
    for run in runs:
        start = starts[run.seed]
        labels = [len(start.start_ids)] + [c.labels for c in run.cycles]
        dice = [start.start_scores["dice"]] + [c.dice for c in run.cycles]
        auc = area_under_curve(labels, dice)
        per_case = [a.corrections for c in run.cycles for a in c.annotations]
        aucs.append(auc)
        finals.append(dice[-1])
        corrections.append(float(np.mean(per_case)) if per_case else 0.0)
        per_seed[run.seed] = {
            "auc": round(auc, 4),
            "final_dice": dice[-1],
            "mean_corrections": round(corrections[-1], 3),
        }
    return {
        "seeds": sorted(per_seed),
        "auc": _spread(aucs),
        "final_dice": _spread(finals),
        "mean_corrections": _spread(corrections),
        "per_seed": per_seed,
    }


def score_diagnostic(start: SeedStart, device, dtype, features: FrozenEncoderFeatures | None) -> dict:
    """How well the uncertainty score ranks the pool by the start model's real error: per case the score (as the
    strategy computes it) and the propagated Dice from a box on the largest slice; Spearman's rho between the score
    and 1 - Dice, and the means per kind."""
    from scipy.stats import spearmanr

    rows = []
    for case in start.pool:
        session = VolumeSession(case.study.frames, start.model, device, dtype, SEGMENTER_FEATURE_DTYPE)
        if features is not None:
            features.seed(start.uris[case.name], session)
        score = propagation_uncertainty(session)
        result = propagate_volume(session, key_slice_prompts(case.study.label))
        dice = dice_score(result.binary_mask("1"), case.study.label > 0)
        rows.append((case.kind, score, dice))
    scores, dices = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    rho = spearmanr(scores, 1 - dices).statistic if len(rows) > 2 else float("nan")
    kinds = sorted({r[0] for r in rows})
    return {
        "spearman_score_vs_error": round(float(rho), 3),
        "score_by_kind": {k: round(float(np.mean([r[1] for r in rows if r[0] == k])), 4) for k in kinds},
        "dice_by_kind": {k: round(float(np.mean([r[2] for r in rows if r[0] == k])), 4) for k in kinds},
    }


# --- the base model ------------------------------------------------------------------------------------------------


def pretrained_base(
    image_size: int, steps: int, lr: float, device, dtype, cache_dir: Path | None, log: Callable[[dict], None]
) -> torch.nn.Module:
    """The MedSAM2 architecture at ``image_size`` input, trained from random weights on 40 generic studies for
    ``steps`` clips (the best of its epochs on 4 more), cached under ``cache_dir``."""
    torch.manual_seed(0)
    model = build_model(MEDSAM2_CONFIG, device, image_size_overrides(image_size) if image_size != 512 else [])
    if steps <= 0:
        return model.eval()
    key = f"al_base_{image_size}_{steps}_{lr:g}_v1.pt"
    path = cache_dir / key if cache_dir else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        log({"kind": "pretrain", "cached": str(path)})
        return model.eval()
    shape = (16, 48, 48)
    source = [generate_case(f"gen{i:03d}", "generic", 900_000 + i, shape).study for i in range(40)]
    val = [generate_case(f"genval{i}", "generic", 990_000 + i, shape).study for i in range(4)]
    epochs = max(1, steps // 25)
    settings = train_settings(25, epochs, lr, 0, 6, p_box=0.7)
    best: dict = {}
    t0 = time.perf_counter()

    def keep(m, report):
        best.update({k: v.detach().clone() for k, v in m.state_dict().items()})

    result = train(model, source, val, settings, device, dtype, keep)
    if best:
        model.load_state_dict(best)
    log(
        {
            "kind": "pretrain",
            "steps": epochs * 25,
            "seconds": round(time.perf_counter() - t0, 1),
            "initial_dice": round(result.initial["dice"], 4),
            "best_dice": round(result.best_dice, 4),
            "best_epoch": result.best_epoch,
            "epoch_dice": [round(e.val_dice, 4) for e in result.epochs],
        }
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def markdown_tables(lines: Sequence[dict]) -> str:
    """The result tables of a JSON-lines file: held-out Dice per cycle (mean and sd over seeds), corrections per
    picked case, then the summary per strategy and the paired difference to ``random``."""
    starts = {d["seed"]: d for d in lines if d.get("kind") == "start"}
    cycles = [d for d in lines if d.get("kind") == "cycle"]
    strategies = list(dict.fromkeys(d["strategy"] for d in cycles))
    n_cycles = max((d["cycle"] for d in cycles), default=0)
    seeds = sorted(starts)

    def ms(values: Sequence[float], digits: int = 3) -> str:
        v = np.asarray(values, float)
        return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"

    start_labels = starts[seeds[0]]["labels"] if seeds else 0
    head = ["strategy", f"start ({start_labels} labels)"]
    for c in range(1, n_cycles + 1):
        labels = next(d["labels"] for d in cycles if d["cycle"] == c)
        head.append(f"cycle {c} ({labels})")
    out = ["Held-out Dice (mean ± sd over seeds " + ", ".join(map(str, seeds)) + "); corrections per picked case:", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    start_dice = ms([starts[s]["held_out_dice"] for s in seeds])
    for name in strategies:
        row = [f"`{name}`", start_dice]
        for c in range(1, n_cycles + 1):
            here = [d for d in cycles if d["strategy"] == name and d["cycle"] == c]
            corr = np.mean([x for d in here for x in d["corrections"]])
            row.append(f"{ms([d['held_out_dice'] for d in here])}; {corr:.2f} corr.")
        out.append("| " + " | ".join(row) + " |")
    summaries = {d["strategy"]: d for d in lines if d.get("kind") == "summary"}
    if summaries:
        out += [
            "",
            "| strategy | AUC of Dice vs labels | final Dice | corrections per case | AUC − `random`, per seed |",
        ]
        out.append("|---|---|---|---|---|")
        base = summaries.get("random")
        for name, d in summaries.items():
            diffs = (
                ", ".join(f"{d['per_seed'][str(s)]['auc'] - base['per_seed'][str(s)]['auc']:+.4f}" for s in seeds)
                if base and name != "random"
                else ""
            )
            out.append(
                f"| `{name}` | {d['auc']['mean']:.4f} ± {d['auc']['sd']:.4f} | "
                f"{d['final_dice']['mean']:.4f} ± {d['final_dice']['sd']:.4f} | "
                f"{d['mean_corrections']['mean']:.2f} ± {d['mean_corrections']['sd']:.2f} | {diffs} |"
            )
    return "\n".join(out)


# --- CLI -----------------------------------------------------------------------------------------------------------


def _cycle_line(name: str, seed: int, c: Cycle) -> dict:
    return {
        "kind": "cycle",
        "strategy": name,
        "seed": seed,
        "cycle": c.cycle,
        "labels": c.labels,
        "picked": [p.case for p in c.picks],
        "picked_kinds": [a.kind for a in c.annotations],
        "picked_score": [round(p.scores[p.case], 4) if p.scores else None for p in c.picks],
        "corrections": [a.corrections for a in c.annotations],
        "mean_corrections": round(float(np.mean([a.corrections for a in c.annotations])), 3) if c.annotations else 0,
        "dice_first": [a.dice_first for a in c.annotations],
        "dice_corrected": [a.dice_corrected for a in c.annotations],
        "held_out_dice": c.dice,
        "held_out_dice_by_kind": c.dice_by_kind,
        "train_loss": c.train_loss,
        "seconds": c.seconds,
        "phase_seconds": c.phase_seconds,
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--strategies", default=",".join((*STRATEGIES, "oracle")), help="oracle: a reference (uses the truth)"
    )
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--test", type=int, default=12)
    ap.add_argument("--start", type=int, default=2)
    ap.add_argument("--per-cycle", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="training clips per retraining epoch")
    ap.add_argument("--epochs", type=int, default=2, help="retraining epochs per cycle")
    ap.add_argument("--start-steps", type=int, default=12, help="clips of the seed's first fine-tuning")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--pretrain-steps", type=int, default=100)
    ap.add_argument(
        "--init",
        default="",
        help="start every seed from this checkpoint instead of pretraining a base, e.g. the reference model "
        "tests/fixtures/reference_sam2.pt (with --model-config)",
    )
    ap.add_argument("--model-config", default="", help="the Hydra config of --init")
    ap.add_argument("--clip-length", type=int, default=4)
    ap.add_argument("--loss", choices=("sam2", "dice_ce"), default="sam2", help="the retraining loss")
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--max-corrections", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.8, help="per-slice Dice below which a slice is corrected")
    ap.add_argument("--no-diagnostic", action="store_true", help="skip the score-vs-error diagnostic per seed")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "bench"), help="where the pretrained base is kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="")
    ap.add_argument("--table", default="", help="print the markdown tables of a results file and exit")
    return ap.parse_args()


def loop_config(args: argparse.Namespace) -> LoopConfig:
    """The loop's settings from the command line."""
    return LoopConfig(
        pool=args.pool,
        test=args.test,
        start=args.start,
        per_cycle=args.per_cycle,
        cycles=args.cycles,
        shape=(args.slices, args.size, args.size),
        steps=args.steps,
        epochs=args.epochs,
        start_steps=args.start_steps,
        lr=args.lr,
        clip_length=args.clip_length,
        loss=args.loss,
        annotator=AnnotatorSettings(threshold=args.threshold, max_corrections=args.max_corrections),
    )


def _start_line(seed: int, start: SeedStart, seconds: float) -> dict[str, Any]:
    """A seed's starting point: its labelled studies, the pool's kinds, the start model's held-out Dice."""
    return {
        "kind": "start",
        "seed": seed,
        "labels": len(start.start_ids),
        "start_ids": start.start_ids,
        "start_kinds": [c.kind for c in start.pool if c.name in start.start_ids],
        "pool_kinds": {k: sum(c.kind == k for c in start.pool) for k in sorted(set(KINDS))},
        "held_out_dice": start.start_scores["dice"],
        "held_out_dice_by_kind": start.start_scores["dice_by_kind"],
        "seconds": round(seconds, 1),
    }


def start_model(args: argparse.Namespace, device: torch.device, dtype, emit) -> torch.nn.Module:
    """The model every seed starts from: ``--init`` (e.g. the reference model) or a base pretrained here."""
    if args.init:
        return load_model(resolve_checkpoint(args.init, config=args.model_config or None), device).eval()
    return pretrained_base(
        args.image_size, args.pretrain_steps, args.pretrain_lr, device, dtype, Path(args.cache), emit
    )


def run_seeds(args, config, strategies, base, device, dtype, emit) -> tuple[dict, dict]:
    """Every strategy from every seed's start: ({strategy: [RunResult per seed]}, {seed: SeedStart})."""
    features = FrozenEncoderFeatures(base)
    runs: dict[str, list[RunResult]] = {s: [] for s in strategies}
    starts: dict[int, SeedStart] = {}
    with tempfile.TemporaryDirectory(prefix="al_bench_") as tmp:
        for seed in [int(s) for s in args.seeds.split(",") if s != ""]:
            t0 = time.perf_counter()
            start = starts[seed] = prepare_seed(seed, base, config, Path(tmp), device, dtype, features)
            line = _start_line(seed, start, time.perf_counter() - t0)
            if not args.no_diagnostic:
                line["uncertainty_diagnostic"] = score_diagnostic(start, device, dtype, features)
            emit(line)
            for name in strategies:
                run = run_strategy(
                    name, start, config, device, dtype, features, lambda c, n=name, s=seed: emit(_cycle_line(n, s, c))
                )
                run.model = None  # keep one model at a time
                runs[name].append(run)
    return runs, starts


def _comparison(summaries: dict[str, dict], seeds: list[int]) -> dict[str, Any] | None:
    """Uncertainty against random, seed by seed (None when either did not run)."""
    if "uncertainty" not in summaries or "random" not in summaries:
        return None
    diffs = [summaries["uncertainty"]["per_seed"][s]["auc"] - summaries["random"]["per_seed"][s]["auc"] for s in seeds]
    return {
        "kind": "comparison",
        "a": "uncertainty",
        "b": "random",
        "auc_difference_per_seed": [round(d, 4) for d in diffs],
        "auc_difference": _spread(diffs),
        "a_better_in_seeds": int(sum(d > 0 for d in diffs)),
    }


def main() -> None:
    args = parse_args()
    if args.table:
        print(markdown_tables([json.loads(x) for x in Path(args.table).read_text().splitlines() if x.startswith("{")]))
        return
    device = torch.device(args.device)
    dtype = compute_dtype_for(device)
    strategies = [s for s in args.strategies.split(",") if s]
    config = loop_config(args)
    started = time.perf_counter()
    emit = JsonLines(args.out, with_load=False, device=device_name(device) if device.type != "cpu" else "cpu").emit
    emit(
        {
            "kind": "config",
            "model": f"{args.init} ({args.model_config})"
            if args.init
            else f"hiera-t {args.image_size} (MedSAM2 shape)",
            "dtype": dtype_name(dtype),
            "torch_threads": torch.get_num_threads(),
            "seeds": [int(s) for s in args.seeds.split(",") if s != ""],
            "strategies": strategies,
            **{k: v for k, v in dataclasses.asdict(config).items() if k != "annotator"},
            "annotator": dataclasses.asdict(config.annotator),
            "pretrain_steps": args.pretrain_steps,
            "loadavg_1m": loadavg(),
        }
    )
    base = start_model(args, device, dtype, emit)
    runs, starts = run_seeds(args, config, strategies, base, device, dtype, emit)
    summaries = {name: summarise(results, starts) for name, results in runs.items()}
    for name, summary in summaries.items():
        emit({"kind": "summary", "strategy": name, **summary})
    comparison = _comparison(summaries, list(starts))
    if comparison:
        emit(comparison)
    emit({"kind": "done", "minutes": round((time.perf_counter() - started) / 60, 2), "loadavg_1m": loadavg()})


if __name__ == "__main__":
    main()
