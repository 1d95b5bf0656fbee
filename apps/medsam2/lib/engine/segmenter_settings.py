"""The segmenter's settings (from ``--conf``), read by every unit of the segmenter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lib.engine.preprocessing import IntensityWindow
from lib.engine.prompts import LabelMap
from lib.engine.propagation import CorrectionRule, StopRule, TrackingOptions


@dataclass
class SegmenterSettings:
    """Per-app settings, from ``--conf``."""

    window: IntensityWindow
    labels: LabelMap  # the default label map; a request may bring the image's own (docs/api.md)
    max_voxels: int | None = 512 * 512 * 1200
    encode_batch: int = 8
    feature_dtype: torch.dtype = torch.float32
    stop_rule: StopRule | None = None  # the default for 3D requests; a request can turn it on or off
    slices_to_check: int = 5
    scribble_mode: str = "points"  # how scribbles reach SAM2: sampled clicks or a mask (bench/scribble_prompts.py)
    undo_levels: int = 16
    tracking: TrackingOptions = field(default_factory=TrackingOptions)  # region of interest, key slices, workers
    local_corrections: CorrectionRule | None = None  # None: a correction recomputes the whole label
