"""Generated multi-object volumes where only the prompt can say which object is wanted: several objects of the
same intensity and texture per slice, of different shapes and places, some close to each other (a gap of one to
three voxels), each starting and ending along the slice axis, plus darker unlabelled blobs. Deterministic per
seed: the reference model (scripts/train_reference_model.py), its scores, the tests and the benches all draw
their volumes from here. No MONAI Label imports."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lib.training.data import Study

TRAIN_SEEDS = range(0, 100_000)  # the reference model trained on the first few hundred
VALIDATION_SEEDS = range(500_000, 600_000)  # its training validated (chose its best epoch) on the first few
HELD_OUT_SEEDS = range(1_000_000, 1_100_000)  # never seen in training: its scores, the tests, the benches


@dataclass(frozen=True)
class VolumeRecipe:
    """How a generated volume looks (sizes in voxels; ranges inclusive)."""

    slices: int = 32
    size: int = 64  # rows = columns
    objects: tuple[int, int] = (2, 4)
    radius: tuple[float, float] = (6.0, 11.0)  # in-plane semi-axes at an object's widest slice
    extent: tuple[int, int] = (9, 22)  # slices an object spans
    p_close: float = 0.6  # chance that an object is placed 1-3 voxels from one already there
    object_mean: float = 165.0
    object_jitter: float = 8.0  # per-object shift of the mean: the same class, not the same value
    background_mean: float = 85.0
    noise_sd: float = 16.0
    distractors: tuple[int, int] = (0, 2)  # unlabelled dark blobs
    distractor_mean: float = 35.0
    spacing_kji: tuple[float, float, float] = (2.5, 1.0, 1.0)


@dataclass(frozen=True)
class _Shape:
    """One object: where and how large it is on each slice it spans."""

    first: int
    last: int
    center: tuple[float, float]  # (row, col) on the middle slice
    drift: tuple[float, float]  # voxels per slice
    axes: tuple[float, float]
    angle: float
    twist: float  # radians per slice
    lobes: tuple[tuple[float, float], ...]  # (amplitude, phase) of the 2nd and 3rd radial harmonics


def _draw_shape(rng: np.random.Generator, recipe: VolumeRecipe, center=None, middle=None) -> _Shape:
    n, size = recipe.slices, recipe.size
    length = int(rng.integers(recipe.extent[0], min(recipe.extent[1], n - 4) + 1))
    # every object starts and ends inside the volume (two empty slices at least on each side)
    if middle is None:
        first = int(rng.integers(2, n - length - 1))
    else:  # near another object's middle slice, so that the two share slices
        first = int(np.clip(middle - length // 2 + rng.integers(-3, 4), 2, n - length - 2))
    axes = tuple(float(a) for a in rng.uniform(*recipe.radius, 2))
    margin = max(axes) + 3
    if center is None:
        center = tuple(float(c) for c in rng.uniform(margin, size - margin, 2))
    lobes = tuple((float(rng.uniform(0, 0.12)), float(rng.uniform(0, 2 * np.pi))) for _ in range(2))
    return _Shape(
        first,
        first + length - 1,
        center,
        tuple(float(d) for d in rng.uniform(-0.35, 0.35, 2)),
        axes,
        float(rng.uniform(0, np.pi)),
        float(rng.uniform(-0.06, 0.06)),
        lobes,
    )


def _shape_mask(shape: _Shape, recipe: VolumeRecipe) -> np.ndarray:
    """(slices, size, size) bool: the object, widest on its middle slice and half as wide at its ends."""
    mask = np.zeros((recipe.slices, recipe.size, recipe.size), dtype=bool)
    rows, cols = np.mgrid[0 : recipe.size, 0 : recipe.size].astype(np.float32)
    middle, half = (shape.first + shape.last) / 2, max((shape.last - shape.first) / 2, 0.5)
    for k in range(shape.first, shape.last + 1):
        t = (k - middle) / half
        scale = 0.5 + 0.5 * np.sqrt(max(1.0 - t * t, 0.0))
        cy, cx = (c + d * (k - middle) for c, d in zip(shape.center, shape.drift, strict=True))
        angle = shape.angle + shape.twist * (k - middle)
        u = (cols - cx) * np.cos(angle) + (rows - cy) * np.sin(angle)
        v = -(cols - cx) * np.sin(angle) + (rows - cy) * np.cos(angle)
        u, v = u / shape.axes[0], v / shape.axes[1]
        phi = np.arctan2(v, u)
        bound = scale * (1 + sum(a * np.cos((m + 2) * (phi - p)) for m, (a, p) in enumerate(shape.lobes)))
        mask[k] = np.hypot(u, v) <= bound
    return mask


def _in_plane_distance(mask: np.ndarray) -> np.ndarray:
    """Distance in voxels from each voxel to ``mask`` on its own slice (large on slices without it)."""
    if not mask.any():
        return np.full(mask.shape, 1e9, dtype=np.float32)
    return ndimage.distance_transform_edt(~mask, sampling=(1e6, 1.0, 1.0)).astype(np.float32)


def _fits(mask: np.ndarray, taken_distance: np.ndarray, min_gap: float, size: int) -> bool:
    """Inside the image (two voxels of margin), and at least ``min_gap`` voxels from every object placed."""
    if mask.sum() < 20:
        return False
    rows, cols = np.nonzero(mask.any(axis=0))
    if rows.min() < 2 or cols.min() < 2 or rows.max() > size - 3 or cols.max() > size - 3:
        return False
    return bool(taken_distance[mask].min() > min_gap)


def _shifted(mask: np.ndarray, rows: int, cols: int) -> np.ndarray | None:
    """``mask`` moved by whole voxels in-plane; None when part of it would leave the image."""
    size = mask.shape[1]
    if abs(rows) >= size or abs(cols) >= size:
        return None
    out = np.zeros_like(mask)
    src = mask[:, max(0, -rows) : size - max(0, rows), max(0, -cols) : size - max(0, cols)]
    out[:, max(0, rows) : size - max(0, -rows), max(0, cols) : size - max(0, -cols)] = src
    return out if out.sum() == mask.sum() else None


def _place_close(rng, recipe: VolumeRecipe, anchor: _Shape, taken_distance: np.ndarray) -> np.ndarray | None:
    """An object beside ``anchor``: moved out from its centre along a random direction until there is a gap."""
    centered = _shape_mask(
        _draw_shape(rng, recipe, center=anchor.center, middle=(anchor.first + anchor.last) // 2), recipe
    )
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    for step in np.arange(4.0, recipe.size, 1.0):
        rows, cols = (int(round(d * step)) for d in direction)
        mask = _shifted(centered, rows, cols)
        if mask is None:
            return None
        if _fits(mask, taken_distance, 1.0, recipe.size):
            return mask if taken_distance[mask].min() <= 4.0 else None  # 1-3 voxels of background between the two
    return None


def _place_objects(rng: np.random.Generator, recipe: VolumeRecipe) -> list[np.ndarray]:
    """The objects' masks, none overlapping, each at least one voxel from the others on every slice."""
    count = int(rng.integers(recipe.objects[0], recipe.objects[1] + 1))
    masks: list[np.ndarray] = []
    shapes: list[_Shape] = []
    taken = np.zeros((recipe.slices, recipe.size, recipe.size), dtype=bool)
    for _ in range(count * 30):
        if len(masks) == count:
            break
        distance = _in_plane_distance(taken)
        if shapes and rng.random() < recipe.p_close:
            mask = _place_close(rng, recipe, shapes[int(rng.integers(len(shapes)))], distance)
            shape = None
        else:
            shape = _draw_shape(rng, recipe)
            mask = _shape_mask(shape, recipe)
            mask = mask if _fits(mask, distance, 5.0, recipe.size) else None
        if mask is None:
            continue
        masks.append(mask)
        shapes.append(shape or _shape_of(mask))
        taken |= mask
    return masks


def _shape_of(mask: np.ndarray) -> _Shape:
    """An approximate shape record of a placed mask (its slice range and mean centre), to place others near it."""
    ks = np.nonzero(mask.any(axis=(1, 2)))[0]
    _, rows, cols = np.nonzero(mask)
    return _Shape(int(ks[0]), int(ks[-1]), (float(rows.mean()), float(cols.mean())), (0, 0), (1, 1), 0, 0, ())


def _intensities(rng: np.random.Generator, recipe: VolumeRecipe, masks: list[np.ndarray]) -> np.ndarray:
    """Smoothly varying background, objects of one class (means within ``object_jitter``), dark blobs, noise."""
    shape = (recipe.slices, recipe.size, recipe.size)
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma=(3, 10, 10))
    image = recipe.background_mean + 15.0 * field / max(float(np.abs(field).max()), 1e-6)
    for _ in range(int(rng.integers(recipe.distractors[0], recipe.distractors[1] + 1))):
        blob = _shape_mask(_draw_shape(rng, recipe), recipe)
        image[blob & ~np.any(masks, axis=0)] = recipe.distractor_mean
    for mask in masks:
        image[mask] = recipe.object_mean + rng.uniform(-recipe.object_jitter, recipe.object_jitter)
    image = ndimage.gaussian_filter(image, sigma=(0, 0.7, 0.7))  # partial volume at the edges
    return image + rng.normal(0, recipe.noise_sd, shape)


def generate_study(seed: int, recipe: VolumeRecipe = VolumeRecipe(), name: str | None = None) -> Study:
    """One generated volume (uint8 frames, label map 1..n in placement order), the same for the same seed."""
    rng = np.random.default_rng([seed, 29])
    masks = _place_objects(rng, recipe)
    label = np.zeros((recipe.slices, recipe.size, recipe.size), dtype=np.uint8)
    for value, mask in enumerate(masks, start=1):
        label[mask] = value
    frames = np.clip(np.rint(_intensities(rng, recipe, masks)), 0, 255).astype(np.uint8)
    return Study(name or f"synthetic{seed}", frames, label, recipe.spacing_kji)


def generate_studies(seeds: Iterable[int], recipe: VolumeRecipe = VolumeRecipe()) -> list[Study]:
    """:func:`generate_study` for each seed."""
    return [generate_study(int(s), recipe) for s in seeds]


def validation_studies(count: int, recipe: VolumeRecipe = VolumeRecipe()) -> list[Study]:
    """The first ``count`` volumes that the reference model's training validated on."""
    return generate_studies(VALIDATION_SEEDS[:count], recipe)


def held_out_studies(count: int, recipe: VolumeRecipe = VolumeRecipe(), start: int = 0) -> list[Study]:
    """``count`` held-out volumes from the ``start``-th on (never seen by the reference model's training)."""
    return generate_studies(HELD_OUT_SEEDS[start : start + count], recipe)
