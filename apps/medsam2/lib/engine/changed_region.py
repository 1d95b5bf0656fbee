"""Changed-region answers (docs/api.md): the smallest box holding every voxel where a new label differs from the
label a client holds, so an answer carries that box instead of the whole volume. Writing the box over the client's
copy reproduces the new label voxel for voxel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ChangedRegion:
    """A box in (k, j, i) voxel indices of the image, and how many voxels in it changed."""

    since: str  # the state the box is measured against (an answer_id, or "empty")
    offset_kji: tuple[int, int, int]
    size_kji: tuple[int, int, int]
    changed_voxels: int

    def crop(self, label_kji: np.ndarray) -> np.ndarray:
        """The box's voxels of ``label_kji`` (a new label: what the client writes over its copy)."""
        (k0, j0, i0), (sk, sj, si) = self.offset_kji, self.size_kji
        return label_kji[k0 : k0 + sk, j0 : j0 + sj, i0 : i0 + si]

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "offset_ijk": list(self.offset_kji[::-1]),
            "size_ijk": list(self.size_kji[::-1]),
            "changed_voxels": self.changed_voxels,
        }

    @classmethod
    def from_json(cls, answer: dict[str, Any]) -> ChangedRegion:
        """The region an answer JSON names (as :meth:`as_json` wrote it)."""
        offset, size = answer["offset_ijk"], answer["size_ijk"]
        return cls(answer["since"], tuple(offset[::-1]), tuple(size[::-1]), answer["changed_voxels"])  # type: ignore[arg-type]


def changed_region(new_kji: np.ndarray, old_kji: np.ndarray, since: str) -> ChangedRegion:
    """The smallest box holding every voxel where ``new_kji`` differs from ``old_kji``; when none differs, the
    1x1x1 box at the origin (writing it is still exact: it holds the value both labels have there)."""
    if new_kji.shape != old_kji.shape:
        raise ValueError(f"labels of different shapes: {new_kji.shape} and {old_kji.shape}")
    differs = new_kji != old_kji
    changed = int(np.count_nonzero(differs))
    if changed == 0:
        return ChangedRegion(since, (0, 0, 0), (1, 1, 1), 0)
    bounds = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(differs.any(axis=others))
        bounds.append((int(hit[0]), int(hit[-1]) + 1))
    offset = tuple(lo for lo, _ in bounds)
    size = tuple(hi - lo for lo, hi in bounds)
    return ChangedRegion(since, offset, size, changed)  # type: ignore[arg-type]


def apply_region(held_kji: np.ndarray, region: ChangedRegion, box_kji: np.ndarray) -> None:
    """What a client does with a changed-region answer: write the box over the label it holds (in place)."""
    (k0, j0, i0), (sk, sj, si) = region.offset_kji, region.size_kji
    if box_kji.shape != (sk, sj, si):
        raise ValueError(f"the box holds {box_kji.shape} voxels, the region says {(sk, sj, si)}")
    held_kji[k0 : k0 + sk, j0 : j0 + sj, i0 : i0 + si] = box_kji
