"""Training options from a request body, checked strictly before a run starts: the right type, finite, within
sensible bounds, and no unknown option names. No MONAI Label imports."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from lib.training.settings import TrainSettings

# inclusive bounds of numeric options; a field added to TrainSettings later is only type- and finiteness-checked
BOUNDS: dict[str, tuple[float, float]] = {
    "epochs": (1, 100_000),
    "steps_per_epoch": (0, 10_000_000),
    "clips_per_step": (0, 256),
    "clip_length": (1, 1024),
    "max_objects": (1, 255),
    "lr": (1e-12, 1.0),
    "lr_image_encoder": (0.0, 1.0),
    "weight_decay": (0.0, 10.0),
    "grad_clip": (0.0, 1e6),
    "val_fraction": (0.0, 0.9),
    "nsd_tolerance_mm": (0.0, 1000.0),
    "p_box": (0.0, 1.0),
    "p_mask": (0.0, 1.0),
    "p_correction": (0.0, 1.0),
    "p_cross_end": (0.0, 1.0),
    "seed": (0, 2**32 - 1),
    "warmup_fraction": (0.0, 0.9),
    "patience": (0, 100_000),
    "feature_cache_mb": (0, 1_000_000),
    "publish_max_drop": (0.0, 1.0),
    "publish_max_overlap_rise": (0.0, 1.0),
    "spike_factor": (0.0, 1000.0),
    "lora_rank": (1, 1024),
    "lora_alpha": (1e-6, 1e6),
}
# request keys besides TrainSettings' fields: MONAI Label's multi-GPU options, the device, the model name, and
# client_id, which MONAI Label's Python client (MONAILabelClient) and its 3D Slicer plugin add to every request body:
# it names the client and changes no setting
EXTRA_KEYS = ("multi_gpu", "gpus", "device", "model", "client_id")
MAX_CLIENT_ID = 256
DEVICE = re.compile(r"^(cpu|cuda(:\d{1,3})?)$")


def _as_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"train option {name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"train option {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"train option {name} must be a finite number, got {value!r}")
    return number


def _bound(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def coerce_option(name: str, value: Any, kind: type) -> Any:
    """One option's value as ``kind`` (the field's type); ValueError with a message naming the option."""
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"train option {name} must be a string, got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text in ("1", "true", "yes", "on")
        raise ValueError(f"train option {name} must be true or false, got {value!r}")
    number = _as_number(name, value)
    low, high = BOUNDS.get(name, (-math.inf, math.inf))
    if not low <= number <= high:
        raise ValueError(f"train option {name} must be between {_bound(low)} and {_bound(high)}, got {value!r}")
    if kind is int:
        if number != int(number):
            raise ValueError(f"train option {name} must be a whole number, got {value!r}")
        return int(number)
    return float(number)


def parse_train_settings(request: dict[str, Any], defaults: TrainSettings) -> TrainSettings:
    """The defaults overridden by the request's options (None or "" keep the default); ValueError if invalid."""
    values = dataclasses.asdict(defaults)
    for f in dataclasses.fields(TrainSettings):
        if f.name in request and request[f.name] not in (None, ""):
            values[f.name] = coerce_option(f.name, request[f.name], type(values[f.name]))
    return TrainSettings(**values)


def check_client_id(value: Any) -> None:
    """``client_id`` as MONAI Label's clients send it: absent/null or a string of at most MAX_CLIENT_ID characters."""
    if value is not None and not (isinstance(value, str) and len(value) <= MAX_CLIENT_ID):
        shown = f"{len(value):,} characters" if isinstance(value, str) else f"a value of type {type(value).__name__}"
        raise ValueError(f"client_id names the client: a string of at most {MAX_CLIENT_ID} characters, got {shown}")


def check_train_body(body: Any, defaults: TrainSettings) -> None:
    """A ``POST /train/{model}`` body: a JSON object of known options with valid values; ValueError if not."""
    if not isinstance(body, dict):
        raise ValueError(f'the training options must be a JSON object such as {{"epochs": 2}}, got {body!r}'[:300])
    known = {f.name for f in dataclasses.fields(TrainSettings)} | set(EXTRA_KEYS)
    unknown = sorted(str(k) for k in body if k not in known)
    if unknown:
        raise ValueError(f"unknown train option(s) {unknown[:5]}; the options are: {', '.join(sorted(known))}")
    parse_train_settings(body, defaults)
    check_client_id(body.get("client_id"))
    device = body.get("device")
    if device not in (None, "") and not (isinstance(device, str) and DEVICE.match(device)):
        raise ValueError(f"train option device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    gpus = body.get("gpus")
    if gpus is not None and not isinstance(gpus, (str, int, list)) or isinstance(gpus, bool):
        raise ValueError(f'train option gpus must be "all" or GPU indices such as "0,1", got {gpus!r}')
    if isinstance(gpus, list) and not all(isinstance(g, int) and not isinstance(g, bool) for g in gpus):
        raise ValueError(f'train option gpus must be "all" or GPU indices such as "0,1", got {gpus!r}')
    multi_gpu = body.get("multi_gpu")
    if multi_gpu is not None:
        coerce_option("multi_gpu", multi_gpu, bool)
