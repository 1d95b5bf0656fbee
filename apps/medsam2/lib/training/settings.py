"""What a fine-tuning run does (:class:`TrainSettings`), and the one table of its options.

Each field of :class:`TrainSettings` is declared with :func:`option`: its default, meaning, bounds or choices and
the names MONAI Label's own trainers give the same option (``max_epochs`` for ``epochs``). :func:`train_options`
reads that table from the fields; the request validation (:mod:`lib.training.options`), the ``--conf`` settings
(:mod:`lib.settings`), ``/info`` (the trainer's ``config()``) and the reference docs
(``scripts/reference_docs.py``) are all built from it. No MONAI Label import.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lib.engine.adapters import ADAPTER_NAME

# parts of SAM2 a run may train -> the top-level modules it keeps frozen ("*": every base weight; a "lora" run
# adds low-rank adapters, lib/engine/adapters.py, and trains only them)
TRAIN_PARTS = {
    "all": (),
    "no_image_encoder": ("image_encoder",),
    "no_encoders": ("image_encoder", "sam_prompt_encoder"),
    "lora": ("*",),
}
LOSSES = ("sam2", "dice_ce")
_OPTION = "medsam2_train_option"  # the key of a field's metadata that holds its option


@dataclass(frozen=True)
class OptionSpec:
    """What :func:`option` declares about a field besides its default."""

    meaning: str
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None  # a text option's values match it in full
    pattern_text: str = ""  # the pattern in words, for messages and docs
    monailabel_names: tuple[str, ...] = ()  # what MONAI Label's trainers call the same option
    # MONAI Label's values below this mean "off" under its names (early_stop_patience -1): read as the low bound
    monailabel_off_below: float | None = None


def option(default: Any, meaning: str, **spec: Any) -> Any:
    """A :class:`TrainSettings` field: its default plus an :class:`OptionSpec` (bounds, choices, MONAI Label's
    names for it)."""
    return field(default=default, metadata={_OPTION: OptionSpec(meaning, **spec)})


def _number_text(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class TrainOption:
    """One training option, as every reader of the table sees it."""

    name: str
    kind: type  # int, float, bool or str: the type of the default
    default: Any
    spec: OptionSpec

    @property
    def meaning(self) -> str:
        return self.spec.meaning

    @property
    def allowed(self) -> str:
        """The values it takes, in words (``a whole number from 1 to 100,000``, ``one of sam2, dice_ce``)."""
        s = self.spec
        if s.choices:
            return "one of " + ", ".join(s.choices)
        if self.kind is str:
            return s.pattern_text or "text"
        if self.kind is bool:
            return "true or false"
        what = "a whole number" if self.kind is int else "a number"
        low, high = _number_text(s.low), _number_text(s.high)
        if math.isfinite(s.low) and math.isfinite(s.high):
            return f"{what} from {low} to {high}"
        return f"{what}, at least {low}" if math.isfinite(s.low) else what

    def check(self, value: Any) -> None:
        """ValueError (``<name> must be <allowed>, got <value>``) unless ``value`` is one this option takes."""
        if not self._takes(value):
            raise ValueError(f"{self.name} must be {self.allowed}, got {value!r}"[:300])

    def _takes(self, value: Any) -> bool:
        s = self.spec
        if self.kind is bool or self.kind is str:
            if type(value) is not self.kind:
                return False
            return self.kind is bool or (
                (not s.choices or value in s.choices) and (s.pattern is None or bool(s.pattern.fullmatch(value)))
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (self.kind is float or isinstance(value, int)) and s.low <= value <= s.high


@dataclass
class TrainSettings:
    """What a training run does; every field can come from the request or ``--conf`` (see :func:`option`)."""

    epochs: int = option(
        10, "training epochs; each ends with a validation", low=1, high=100_000, monailabel_names=("max_epochs",)
    )
    steps_per_epoch: int = option(0, "training clips per epoch (0: 4 per training study)", low=0, high=10_000_000)
    clips_per_step: int = option(
        0,
        "clips trained together in one optimiser step (their objects are one batch); 0: 4 on a GPU, 1 on a CPU "
        "(where batching saves little time and multiplies memory)",
        low=0,
        high=256,
        monailabel_names=("train_batch_size",),
    )
    clip_length: int = option(8, "consecutive slices per training clip (forwards or backwards)", low=1, high=1024)
    max_objects: int = option(3, "labelled objects prompted per clip, at most", low=1, high=255)
    lr: float = option(
        5e-5,
        "AdamW learning rate for one clip per step on one process; scaled by √(clips_per_step × processes)",
        low=1e-12,
        high=1.0,
    )
    lr_image_encoder: float = option(3e-5, "learning rate of the image encoder, when it trains", low=0.0, high=1.0)
    warmup_fraction: float = option(
        0.1,
        "share of the optimiser steps with a linear learning-rate warm-up (then cosine decay to 5%)",
        low=0.0,
        high=0.9,
    )
    patience: int = option(
        3,
        "stop after this many epochs without a better validation Dice (0: run every epoch)",
        low=0,
        high=100_000,
        monailabel_names=("early_stop_patience",),
        monailabel_off_below=0,
    )
    feature_cache_mb: int = option(
        2048,
        "memory for image-encoder outputs reused across epochs while the encoder is frozen (0: off)",
        low=0,
        high=1_000_000,
    )
    publish_max_drop: float = option(
        0.02,
        "refuse to publish when Dice on the frozen reference studies drops by more than this",
        low=0.0,
        high=1.0,
    )
    publish_max_overlap_rise: float = option(
        0.05,
        "refuse to publish when the answers' overlap with objects that were not prompted (held-out and reference "
        "studies) rises by more than this: the model follows the prompts less",
        low=0.0,
        high=1.0,
    )
    spike_factor: float = option(
        5.0,
        "skip an optimiser step whose loss exceeds this many times the running median of the last 50 steps (or is "
        "not finite); 3 skips in a row roll the weights back and halve the learning rate (0: off; else above 1)",
        low=0.0,
        high=1000.0,
    )
    weight_decay: float = option(0.1, "AdamW weight decay", low=0.0, high=10.0)
    grad_clip: float = option(0.1, "gradient norm clip", low=0.0, high=1e6)
    train_parts: str = option(
        "no_image_encoder",
        "what trains: `no_image_encoder` (the image encoder stays frozen), `all`, `no_encoders`, or `lora` "
        "(low-rank adapters on the attention projections; every base weight stays frozen)",
        choices=tuple(TRAIN_PARTS),
    )
    loss: str = option(
        "sam2",
        "`sam2`: focal ×20 + Dice + IoU L1 + object-score BCE; `dice_ce`: cross-entropy + Dice + IoU L1 + "
        "object-score BCE",
        choices=LOSSES,
    )
    val_fraction: float = option(
        0.2,
        "share of the labelled studies held out for validation (the last ones by name)",
        low=0.0,
        high=0.9,
        monailabel_names=("val_split",),
    )
    nsd_tolerance_mm: float = option(2.0, "tolerance of the validation NSD, in mm", low=0.0, high=1000.0)
    p_box: float = option(
        0.5, "probability that a clip is prompted with a jittered box (else 1–3 clicks)", low=0.0, high=1.0
    )
    p_mask: float = option(
        0.0,
        "probability of a SAM2 mask prompt (off: it kept the mask decoder from learning in our runs)",
        low=0.0,
        high=1.0,
    )
    p_correction: float = option(0.0, "probability of a correction click on the prompt slice", low=0.0, high=1.0)
    p_cross_end: float = option(
        0.5,
        "probability that a clip starts near where an object ends and runs past it",
        low=0.0,
        high=1.0,
    )
    seed: int = option(0, "random seed of the clip sampling (each DDP process adds its rank)", low=0, high=2**32 - 1)
    lora_rank: int = option(8, "rank of the LoRA adapters of a `lora` run", low=1, high=1024)
    lora_alpha: float = option(
        16.0,
        "LoRA scale numerator: an adapter adds (lora_alpha / lora_rank) · B·A to its weight",
        low=1e-6,
        high=1e6,
    )
    adapter_name: str = option(
        "site",
        "the adapter a `lora` run writes (`adapters/<name>.pt` beside `finetuned_checkpoint`); default: the served "
        "`--conf adapter`, else `site`",
        pattern=ADAPTER_NAME,
        pattern_text="1 to 64 letters, digits, '-' or '_'",
    )

    def __post_init__(self):
        for opt in train_options(type(self)):
            opt.check(getattr(self, opt.name))
        if 0 < self.spike_factor <= 1:  # 1 would skip every step above the median
            raise ValueError(f"spike_factor must be 0 (off) or above 1, got {self.spike_factor!r}")


@functools.cache
def train_options(settings_class: type = TrainSettings) -> tuple[TrainOption, ...]:
    """The table of training options: one per field of ``settings_class`` (TrainSettings or a subclass that adds
    fields with :func:`option`), in field order. TypeError for a field declared without :func:`option`."""
    options = []
    for f in dataclasses.fields(settings_class):
        spec = f.metadata.get(_OPTION)
        if not isinstance(spec, OptionSpec):
            raise TypeError(f"{settings_class.__name__}.{f.name} must be declared with option(default, meaning, ...)")
        options.append(TrainOption(f.name, type(f.default), f.default, spec))
    return tuple(options)
