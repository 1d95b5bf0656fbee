"""A changed-region label file (docs/api.md): the voxels of a box of the label volume as a gzip NRRD whose geometry
places the box in patient space where the whole label's voxels lie, with the box's offset and the whole label's size
as key/value lines (``medsam2_offset_ijk:=i0 j0 k0``, ``medsam2_full_size_ijk:=I J K``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import nrrd
import numpy as np
import SimpleITK as sitk

OFFSET_KEY = "medsam2_offset_ijk"
FULL_SIZE_KEY = "medsam2_full_size_ijk"
ANSWER_ID_KEY = "medsam2_answer_id"  # the state the box brings its client to (for clients that ask output=image)
REGION_SUFFIX = ".nrrd"


def write_label_region(
    box_kji: np.ndarray,
    reference: sitk.Image,
    offset_ijk: Sequence[int],
    path: str | os.PathLike,
    answer_id: str | None = None,
) -> None:
    """Write ``box_kji`` (the label's voxels from ``offset_ijk`` on, (k, j, i) order) as a gzip NRRD, uint8, sizes
    in i j k order, in the reference image's patient space (LPS, as SimpleITK and MONAI Label write labels);
    ``answer_id`` names the answer in the header too."""
    offset = [int(v) for v in offset_ijk]
    full = [int(v) for v in reference.GetSize()]
    if box_kji.ndim != 3 or any(o < 0 or o + s > n for o, s, n in zip(offset, box_kji.shape[::-1], full, strict=True)):
        raise ValueError(f"a box of {list(box_kji.shape[::-1])} voxels at {offset} does not fit in {full}")
    direction = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3)
    header = {
        "space": "left-posterior-superior",
        # one row per axis (i, j, k): that axis's unit step in patient space
        "space directions": (direction * np.asarray(reference.GetSpacing(), dtype=float)).T,
        "space origin": np.asarray(reference.TransformIndexToPhysicalPoint(offset), dtype=float),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        OFFSET_KEY: " ".join(str(v) for v in offset),
        FULL_SIZE_KEY: " ".join(str(v) for v in full),
    }
    if answer_id:
        header[ANSWER_ID_KEY] = answer_id
    data = np.ascontiguousarray(box_kji, dtype=np.uint8)
    nrrd.write(str(path), data, header, index_order="C", compression_level=6)
