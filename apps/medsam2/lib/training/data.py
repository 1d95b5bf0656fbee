"""Training data: a :class:`Study` (a volume as uint8 frames with its label map) and the clips of
consecutive slices that training samples from it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lib.engine.preprocessing import IntensityWindow, resolve_window, to_uint8


@dataclass
class Study:
    """A volume as uint8 frames (k, j, i), its label map, and its voxel spacing (k, j, i) in mm."""

    name: str
    frames: np.ndarray
    label: np.ndarray
    spacing_kji: tuple[float, float, float]

    @cached_property
    def extents(self) -> dict[int, tuple[int, int]]:
        """First and last slice of each label value."""
        found: dict[int, tuple[int, int]] = {}
        for k in np.nonzero(self.label.reshape(self.label.shape[0], -1).any(axis=1))[0]:
            for v in np.unique(self.label[k]):
                if v:
                    first, _ = found.get(int(v), (int(k), int(k)))
                    found[int(v)] = (first, int(k))
        return found


def load_study(name: str, image_path: str, label_path: str, window: IntensityWindow) -> Study:
    """Read an image and its label map from files; the image windowed to uint8 frames."""
    from lib.imaging.volume_io import load_image  # SimpleITK: only needed for files

    image = load_image(image_path)
    label = load_image(label_path).array
    if label.shape != image.array.shape:
        raise ValueError(f"{name}: label shape {label.shape} differs from the image's {image.array.shape}")
    frames = to_uint8(image.array, resolve_window(window, image.array))
    sx, sy, sz = image.spacing
    return Study(name, frames, label.astype(np.uint8), (sz, sy, sx))


@dataclass
class Clip:
    """Consecutive slices of a study in the order of travel, and the masks of the objects it follows."""

    frames: np.ndarray  # (T, H, W) uint8
    masks: np.ndarray  # (T, B, H, W) bool, one channel per object
    values: list[int]
    study: str = ""  # the study's name and the clip's slice indices: what the encoder-feature cache keys on
    slices: np.ndarray | None = None


def sample_clip(
    study: Study, length: int, max_objects: int, rng: np.random.Generator, p_cross_end: float = 0.0
) -> Clip | None:
    """Consecutive slices starting on a slice that shows the chosen objects (possibly in reverse order).

    With probability ``p_cross_end`` the clip starts close to where one object ends in the direction of travel
    and runs past it: the slices after the end teach the object score that objects end, which uniform starts
    rarely do for long objects (and which the propagation's stop rule reads).
    """
    if not study.extents:
        return None
    reverse = bool(rng.random() < 0.5)
    n = study.frames.shape[0]
    # objects that end inside the volume in the direction of travel (else "past the end" is off the volume)
    ending = [v for v, (first, last) in study.extents.items() if (first > 0 if reverse else last < n - 1)]
    if length > 1 and ending and rng.random() < p_cross_end:
        first, last = study.extents[int(rng.choice(sorted(ending)))]
        lo, hi = (first, min(first + length - 2, last)) if reverse else (max(last - length + 2, first), last)
        start = int(rng.integers(lo, hi + 1))
    else:
        labelled = np.nonzero(study.label.reshape(n, -1).any(axis=1))[0]
        start = int(rng.choice(labelled))
    idx = np.arange(start, start - length, -1) if reverse else np.arange(start, start + length)
    idx = idx[(idx >= 0) & (idx < n)]
    values = [int(v) for v in np.unique(study.label[start]) if v != 0]
    if not values:  # an object with a gap at the chosen slice
        return None
    rng.shuffle(values)
    values = values[:max_objects]
    masks = np.stack([study.label[idx] == v for v in values], axis=1)
    return Clip(study.frames[idx], masks, values, study.name, idx)
