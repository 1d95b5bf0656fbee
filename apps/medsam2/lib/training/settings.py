"""What a fine-tuning run does (:class:`TrainSettings`) and which parts of SAM2 it may train. No torch import:
the MONAI Label config and the request options read these without loading the training code."""

from __future__ import annotations

from dataclasses import dataclass

# parts of SAM2 a run may train -> the top-level modules it keeps frozen
TRAIN_PARTS = {
    "all": (),
    "no_image_encoder": ("image_encoder",),
    "no_encoders": ("image_encoder", "sam_prompt_encoder"),
}


@dataclass
class TrainSettings:
    """What a training run does; every field can come from the request or ``--conf``."""

    epochs: int = 10
    steps_per_epoch: int = 0  # 0: 4 clips per training study
    clip_length: int = 8
    max_objects: int = 3
    lr: float = 5e-5
    lr_image_encoder: float = 3e-5
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

    def __post_init__(self):
        if self.train_parts not in TRAIN_PARTS:
            raise ValueError(f"train_parts must be one of {sorted(TRAIN_PARTS)}, got {self.train_parts!r}")
        if self.loss not in ("sam2", "dice_ce"):
            raise ValueError(f"loss must be 'sam2' or 'dice_ce', got {self.loss!r}")
        if self.epochs < 1 or self.clip_length < 1 or self.max_objects < 1:
            raise ValueError("epochs, clip_length and max_objects must be >= 1")
