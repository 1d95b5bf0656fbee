"""Training options from a request body, checked strictly before a run starts (the right type, finite, within the
table's bounds, no unknown names), and the trainer's options as MONAI Label's clients read them from ``/info``.

Both are built from the one table of training options (:func:`lib.training.settings.train_options`). A request may
name an option by MONAI Label's own name for it (``max_epochs`` for ``epochs``: the table's ``monailabel_names``);
MONAI Label's other standard options mean nothing here and are refused with the reason
(:data:`MONAILABEL_UNMAPPED`). No MONAI Label imports.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from lib.training.settings import TrainOption, TrainSettings, train_options

# request keys besides the options: MONAI Label's multi-GPU options, the device, the model name, and client_id, which
# MONAI Label's Python client (MONAILabelClient) and its 3D Slicer plugin add to every request body: it names the
# client and changes no setting
EXTRA_KEYS = ("multi_gpu", "gpus", "device", "model", "client_id")
# MONAI Label's standard train options (BasicTrainTask) with no equivalent here -> why (refused with this reason)
_NO_MLFLOW = "this app has no MLflow tracking; a run's metrics are in /info train_stats"
MONAILABEL_UNMAPPED: dict[str, str] = {
    "name": "every run publishes to --conf finetuned_checkpoint, not to a folder named per run",
    "pretrained": "every run starts from the served weights",
    "val_batch_size": "validation propagates one held-out study at a time",
    "dataset": "the studies of a run are loaded into memory once",
    "dataloader": "the studies of a run are loaded into memory once",
    "tracking": _NO_MLFLOW,
    "tracking_uri": _NO_MLFLOW,
    "tracking_experiment_name": _NO_MLFLOW,
}
MAX_CLIENT_ID = 256
DEVICE = re.compile(r"^(cpu|cuda(:\d{1,3})?)$")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _options(defaults: TrainSettings, options: Sequence[TrainOption] | None) -> Sequence[TrainOption]:
    return options if options is not None else train_options(type(defaults))


def accepted_names(options: Sequence[TrainOption]) -> dict[str, TrainOption]:
    """Every name a request may use for an option (its own and MONAI Label's) -> the option."""
    return {name: o for o in options for name in (o.name, *o.spec.monailabel_names)}


def _as_kind(value: Any, kind: type) -> Any:
    """``value`` (JSON) as ``kind``; None when it is not one (numbers may come as text, flags as words)."""
    if kind is str:
        return value if isinstance(value, str) else None
    if kind is bool:
        text = value if isinstance(value, bool) else str(value).strip().lower()
        return value if isinstance(value, bool) else True if text in _TRUE else False if text in _FALSE else None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        return None
    return int(number) if kind is int else number


def coerce_option(option: TrainOption, value: Any, given_as: str | None = None) -> Any:
    """One option's value from a request, as the option's type; ValueError naming the option (and the name the
    request gave it) when it is not one the option takes."""
    shown = option.name if given_as in (None, option.name) else f"{given_as} ({option.name} here)"
    converted = _as_kind(value, option.kind)
    off_below = option.spec.monailabel_off_below
    if given_as in option.spec.monailabel_names and off_below is not None and converted is not None:
        converted = option.spec.low if converted < off_below else converted  # MONAI Label's "off"
    try:
        if converted is None:
            raise ValueError
        option.check(converted)
    except ValueError:
        raise ValueError(f"train option {shown} must be {option.allowed}, got {value!r}"[:300]) from None
    return converted


def requested_options(request: dict[str, Any], options: Sequence[TrainOption]) -> dict[str, tuple[str, Any]]:
    """Option name -> (the name the request used, its value) for the options the request sets (None or "" keep
    the default); ValueError when it names one option twice (e.g. ``epochs`` and ``max_epochs``)."""
    given: dict[str, tuple[str, Any]] = {}
    for name, option in accepted_names(options).items():
        if name not in request or request[name] in (None, ""):
            continue
        if option.name in given:
            raise ValueError(f"{given[option.name][0]} and {name} are the same option ({option.name}); send one")
        given[option.name] = (name, request[name])
    return given


def parse_train_settings(
    request: dict[str, Any], defaults: TrainSettings, options: Sequence[TrainOption] | None = None
) -> TrainSettings:
    """The defaults overridden by the request's options; ValueError if one is invalid."""
    opts = {o.name: o for o in _options(defaults, options)}
    given = requested_options(request, list(opts.values()))
    return dataclasses.replace(defaults, **{n: coerce_option(opts[n], v, as_) for n, (as_, v) in given.items()})


def check_client_id(value: Any) -> None:
    """``client_id`` as MONAI Label's clients send it: absent/null or a string of at most MAX_CLIENT_ID characters."""
    if value is not None and not (isinstance(value, str) and len(value) <= MAX_CLIENT_ID):
        shown = f"{len(value):,} characters" if isinstance(value, str) else f"a value of type {type(value).__name__}"
        raise ValueError(f"client_id names the client: a string of at most {MAX_CLIENT_ID} characters, got {shown}")


def _check_names(body: dict[str, Any], options: Sequence[TrainOption]) -> None:
    known = set(accepted_names(options)) | set(EXTRA_KEYS)
    unmapped = sorted(str(k) for k in body if k in MONAILABEL_UNMAPPED)
    if unmapped:
        key = unmapped[0]
        raise ValueError(f"MONAI Label's train option {key} has no equivalent here: {MONAILABEL_UNMAPPED[key]}")
    unknown = sorted(str(k) for k in body if k not in known)
    if unknown:
        names = ", ".join(o.name for o in options)
        raise ValueError(f"unknown train option(s) {unknown[:5]}; the options are: {names}, {', '.join(EXTRA_KEYS)}")


def check_train_body(body: Any, defaults: TrainSettings, options: Sequence[TrainOption] | None = None) -> None:
    """A ``POST /train/{model}`` body: a JSON object of known options with valid values; ValueError if not."""
    if not isinstance(body, dict):
        raise ValueError(f'the training options must be a JSON object such as {{"epochs": 2}}, got {body!r}'[:300])
    opts = _options(defaults, options)
    _check_names(body, opts)
    parse_train_settings(body, defaults, opts)
    check_client_id(body.get("client_id"))
    device = body.get("device")
    if device not in (None, "") and not (isinstance(device, str) and DEVICE.match(device)):
        raise ValueError(f"train option device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    gpus = body.get("gpus")
    if gpus is not None and not isinstance(gpus, (str, int, list)) or isinstance(gpus, bool):
        raise ValueError(f'train option gpus must be "all" or GPU indices such as "0,1", got {gpus!r}')
    if isinstance(gpus, list) and not all(isinstance(g, int) and not isinstance(g, bool) for g in gpus):
        raise ValueError(f'train option gpus must be "all" or GPU indices such as "0,1", got {gpus!r}')
    if body.get("multi_gpu") is not None and _as_kind(body["multi_gpu"], bool) is None:
        raise ValueError(f"train option multi_gpu must be true or false, got {body['multi_gpu']!r}")


def client_config(defaults: TrainSettings, options: Sequence[TrainOption] | None = None) -> dict[str, Any]:
    """The trainer's options as ``/info`` lists them (``trainers.<model>.config``) for MONAI Label's clients: each
    option's default under its own name; an option with choices as a list, the default first (Slicer shows a
    list as a drop-down and sends its first item back); then MONAI Label's multi-GPU options (off here)."""
    config: dict[str, Any] = {}
    for o in _options(defaults, options):
        value = getattr(defaults, o.name)
        config[o.name] = [value, *(c for c in o.spec.choices if c != value)] if o.spec.choices else value
    return {**config, "multi_gpu": False, "gpus": "all"}
