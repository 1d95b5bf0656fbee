"""What a fine-tuning run does (:class:`TrainSettings`) and which parts of SAM2 it may train. No torch import:
the MONAI Label config and the request options read these without loading the training code."""

from __future__ import annotations

import re
from dataclasses import dataclass

# parts of SAM2 a run may train -> the top-level modules it keeps frozen ("*": every base weight; a "lora" run
# adds low-rank adapters, lib/engine/adapters.py, and trains only them)
TRAIN_PARTS = {
    "all": (),
    "no_image_encoder": ("image_encoder",),
    "no_encoders": ("image_encoder", "sam_prompt_encoder"),
    "lora": ("*",),
}
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as lib.engine.adapters.ADAPTER_NAME (no torch import here)


@dataclass
class TrainSettings:
    """What a training run does; every field can come from the request or ``--conf``."""

    epochs: int = 10
    steps_per_epoch: int = 0  # training clips per epoch; 0: 4 per training study
    clips_per_step: int = 0  # clips trained together in one optimiser step; 0: 4 on a GPU, 1 on a CPU
    clip_length: int = 8
    max_objects: int = 3
    lr: float = 5e-5  # for one clip per step on one process; scaled by sqrt(clips_per_step x processes)
    lr_image_encoder: float = 3e-5
    warmup_fraction: float = 0.1  # share of the optimiser steps with a linear warm-up, then cosine decay
    patience: int = 3  # stop after this many epochs without a better validation Dice (0: never stop early)
    feature_cache_mb: int = 2048  # image-encoder outputs kept per slice while the encoder is frozen (0: off)
    publish_max_drop: float = 0.02  # refuse to publish if the reference set's Dice drops by more than this
    publish_max_overlap_rise: float = 0.05  # ... or the answers' overlap with objects not prompted rises by more
    spike_factor: float = 5.0  # skip a step whose loss exceeds this x the running median (0: off); see spike_guard
    weight_decay: float = 0.1
    grad_clip: float = 0.1
    train_parts: str = "no_image_encoder"
    loss: str = "sam2"  # "sam2": focal x20 + dice + IoU L1 + object score; "dice_ce"
    val_fraction: float = 0.2
    nsd_tolerance_mm: float = 2.0
    p_box: float = 0.5  # else clicks (or, with p_mask, the mask)
    p_mask: float = 0.0  # SAM2-style mask prompts: off by default, see README (they slowed learning here)
    p_correction: float = 0.0  # a correction click on the prompt slice, likewise
    p_cross_end: float = 0.5  # clips that start near an object's end and run past it (see sample_clip)
    seed: int = 0
    # adapters (train_parts="lora")
    lora_rank: int = 8
    lora_alpha: float = 16.0
    adapter_name: str = "site"  # the adapter a lora run writes: adapters/<name>.pt beside the published checkpoint

    def __post_init__(self):
        if self.train_parts not in TRAIN_PARTS:
            raise ValueError(f"train_parts must be one of {sorted(TRAIN_PARTS)}, got {self.train_parts!r}")
        if self.loss not in ("sam2", "dice_ce"):
            raise ValueError(f"loss must be 'sam2' or 'dice_ce', got {self.loss!r}")
        if self.epochs < 1 or self.clip_length < 1 or self.max_objects < 1:
            raise ValueError("epochs, clip_length and max_objects must be >= 1")
        if self.spike_factor != 0 and not self.spike_factor > 1:
            raise ValueError(f"spike_factor must be 0 (off) or above 1, got {self.spike_factor}")
        if self.lora_rank < 1 or not self.lora_alpha > 0:
            raise ValueError(f"lora_rank must be >= 1 and lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}")
        if not (isinstance(self.adapter_name, str) and ADAPTER_NAME.fullmatch(self.adapter_name)):
            raise ValueError(f"adapter_name must be 1 to 64 letters, digits, '-' or '_', got {self.adapter_name!r}")
