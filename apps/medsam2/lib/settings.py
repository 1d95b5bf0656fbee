"""Every ``--conf`` setting of the app in one table (:data:`SETTINGS`): its parser, default, allowed values and
meaning.

:func:`parse_settings` reads MONAI Label's ``--conf`` dictionary once, at start, into :class:`AppSettings`; the
app and its configs read typed values from that, never from ``conf``. A bad value, or a key the app does not
know, raises :class:`SettingError`: one line naming the key, the value and what is allowed.
``docs/configuration.md`` shows this table (written by ``scripts/reference_docs.py``).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lib.engine.adapters import ADAPTER_NAME
from lib.engine.checkpoints import DEFAULT_CHECKPOINT, CheckpointError, resolve_checkpoint
from lib.engine.preprocessing import CT_WINDOWS, IntensityWindow, parse_window
from lib.engine.propagation import CorrectionRule, StopRule
from lib.training.settings import TrainOption, TrainSettings, train_options

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# the defaults of the admission gate (lib.server.admission). GPU: one inference at a time, since the tracking step
# captures CUDA graphs, which other threads' work breaks; CPU: model calls of several annotators overlap well
# (bench/results/load_cpu.jsonl: 2D p95 6.4 s -> 0.04 s at N=4 with 4)
DEFAULT_MAX_CONCURRENT = 1
DEFAULT_MAX_CONCURRENT_CPU = 4
DEFAULT_MAX_QUEUED = 32
DEFAULT_QUEUE_TIMEOUT_S = 120.0
# keys MONAI Label itself reads from --conf (MONAILabelApp: server_mode); accepted and left to it
MONAI_LABEL_KEYS = frozenset({"server_mode"})


class SettingError(ValueError):
    """A ``--conf`` value (or key) the app cannot use; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class NotAllowed(ValueError):
    """Raised by a parser when the value is not allowed; the message is built from the parser's ``allowed``."""


class Parser(Protocol):
    """Turns a ``--conf`` text into a value; raises :class:`NotAllowed`, or ValueError with a full message."""

    @property
    def allowed(self) -> str: ...

    def __call__(self, text: str) -> Any: ...


def _number_text(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Number:
    """A finite number (``int``: a whole number, e.g. ``5``, ``5.0`` or ``1e3``) within bounds."""

    kind: type = float
    low: float = -math.inf
    high: float = math.inf
    low_excluded: bool = False
    unit: str = ""  # how the value is named in messages, e.g. "seconds"; default: "a (whole) number"
    note: str = ""  # e.g. "0: off"

    @property
    def allowed(self) -> str:
        what = self.unit or ("a whole number" if self.kind is int else "a number")
        low, high = _number_text(self.low), _number_text(self.high)
        if math.isfinite(self.low) and math.isfinite(self.high):
            what += f", more than {low} and at most {high}" if self.low_excluded else f" from {low} to {high}"
        elif math.isfinite(self.low):
            what += f", more than {low}" if self.low_excluded else f", at least {low}"
        return f"{what} ({self.note})" if self.note else what

    def __call__(self, text: str) -> int | float:
        try:
            number = float(text)
        except ValueError:
            raise NotAllowed() from None
        if not math.isfinite(number) or number < self.low or number > self.high:
            raise NotAllowed()
        if self.low_excluded and number == self.low:
            raise NotAllowed()
        if self.kind is not int:
            return number
        if not number.is_integer():
            raise NotAllowed()
        return int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else int(number)  # exact for long digit strings


@dataclass(frozen=True)
class Choice:
    """One of a few words."""

    choices: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.choices)

    def __call__(self, text: str) -> str:
        if text.strip() not in self.choices:
            raise NotAllowed()
        return text.strip()


@dataclass(frozen=True)
class Custom:
    """Any other parser: a function and the words that say what it allows."""

    function: Callable[[str], Any]
    allowed: str

    def __call__(self, text: str) -> Any:
        return self.function(text)


@dataclass(frozen=True)
class ByDevice:
    """A default that depends on where the models run."""

    gpu: str
    cpu: str


@dataclass(frozen=True)
class Setting:
    """One ``--conf`` key: how its text is read, its default (text, read the same way), and what it does."""

    key: str
    section: str
    parser: Parser
    default: str | ByDevice
    meaning: str
    shown_default: str = ""  # for the docs, where the default text is not what it means (e.g. "")

    def default_text(self, device_type: str) -> str:
        if isinstance(self.default, ByDevice):
            return self.default.gpu if device_type == "cuda" else self.default.cpu
        return self.default

    def read(self, text: str) -> Any:
        """The value of ``text``; SettingError if it is not allowed."""
        try:
            return self.parser(text)
        except NotAllowed:
            raise SettingError(f"--conf {self.key} must be {self.parser.allowed}, got {_shown(text)}") from None
        except ValueError as e:  # the parser's own message names the value and what is allowed
            raise SettingError(f"--conf {self.key}: {e}") from None


def _shown(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= 120 else shown[:117] + "..."


# ------------------------------------------------------------------------------------------ parsers


def available_models() -> tuple[str, ...]:
    """The model configs the app can serve: the modules of ``lib/configs`` (what ``lib/server/served_models`` finds)."""
    return tuple(sorted(p.stem.lower() for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("__")))


def _models(text: str) -> tuple[str, ...]:
    available = available_models()
    wanted = [m.strip() for m in text.split(",") if m.strip()]
    if not wanted or any(m != "all" and m not in available for m in wanted):
        raise NotAllowed()
    return available if "all" in wanted else tuple(m for m in available if m in wanted)


def _checkpoint(text: str) -> str:
    spec = text.strip() or DEFAULT_CHECKPOINT
    try:
        resolve_checkpoint(spec)  # a known name, random, a URL or an existing file; nothing is downloaded here
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    return spec


def _model_config(text: str) -> Path | None:
    if not text.strip():
        return None
    path = Path(text.strip()).expanduser()
    if not path.is_file():
        raise NotAllowed()
    return path


def _finetuned_checkpoint(text: str) -> Path | None:
    if not text.strip():
        return None
    path = Path(os.path.abspath(os.path.expanduser(text.strip())))
    if path.is_dir():
        raise NotAllowed()
    return path


def _adapter(text: str) -> str:
    name = text.strip()
    if name and not ADAPTER_NAME.fullmatch(name):
        raise NotAllowed()
    return name


def _window(text: str) -> IntensityWindow:
    return parse_window(text)  # its ValueError names the value and the windows


def _labels(text: str) -> dict[str, int]:
    try:
        labels = json.loads(text)
    except ValueError:
        raise NotAllowed() from None
    if not isinstance(labels, dict) or not labels:
        raise NotAllowed()
    values = list(labels.values())
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 255 for v in values):
        raise NotAllowed()
    if len(set(values)) != len(values) or not all(name.strip() for name in labels):
        raise NotAllowed()
    return labels


def _device(text: str) -> str:
    device = text.strip().lower() or "auto"
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", device):
        raise NotAllowed()
    return device


def _stop_rule(text: str) -> StopRule | None:
    try:
        return StopRule.from_text(text)
    except ValueError:
        raise NotAllowed() from None


def _correction_rule(text: str) -> CorrectionRule | None:
    try:
        return CorrectionRule.from_text(text)
    except ValueError:
        raise NotAllowed() from None


def _replica_name(text: str) -> str:
    if text and not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", text):
        raise NotAllowed("1 to 64 letters, digits, '.', '_', ':' or '-'")
    return text


def _sha256(text: str) -> str:
    digest = text.strip().lower()
    if digest and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise NotAllowed()
    return digest


def _file_path(text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text.strip())) if text.strip() else ""
    if path and os.path.isdir(path):
        raise NotAllowed()
    return path


def _audience(text: str) -> str:
    if not re.fullmatch(r"\S{0,256}", text.strip()):
        raise NotAllowed()
    return text.strip()


def _url_or_empty(text: str) -> str:
    if text.strip() and not re.fullmatch(r"https?://\S+", text.strip()):
        raise NotAllowed()
    return text.strip().rstrip("/")


def _boolean(text: str) -> bool:
    word = text.strip().lower()
    if word not in ("true", "false"):
        raise NotAllowed()
    return word == "true"


def _default_text(value: Any) -> str:
    """A TrainSettings default as ``--conf`` text."""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else _number_text(value).replace(",", "")


@dataclass(frozen=True)
class TrainOptionText:
    """A training option's ``--conf`` text: read as the option's type, then checked against its table entry."""

    option: TrainOption

    @property
    def allowed(self) -> str:
        return self.option.allowed

    def __call__(self, text: str) -> Any:
        kind = self.option.kind
        value = _boolean(text) if kind is bool else text.strip() if kind is str else Number(kind)(text)
        try:
            self.option.check(value)
        except ValueError:
            raise NotAllowed() from None
        return value


def training_settings(options: tuple[TrainOption, ...]) -> tuple[Setting, ...]:
    """The ``--conf`` settings of the training options: one per entry of the table, its default for every run."""
    return tuple(Setting(o.name, TRAINING, TrainOptionText(o), _default_text(o.default), o.meaning) for o in options)


# ------------------------------------------------------------------------------------------ the table

SECONDS_TO_HOUR = Number(float, 0, 3600, low_excluded=True, unit="seconds")
MODEL, MEMORY, PACS, TRAINING = "Model and images", "Memory and load", "PACS (DICOMweb)", "Training defaults"
OPERATIONS = "Operations"
ACCESS = "Login and sessions"
DEFAULT_LABELS = '{"lesion":1,"organ":2,"vessel":3,"other":4}'
_WINDOWS = ", ".join(CT_WINDOWS)

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "checkpoint",
        MODEL,
        Custom(_checkpoint, "a checkpoint name (see Checkpoints), random, an https:// URL or an existing file"),
        DEFAULT_CHECKPOINT,
        "the weights; a named or URL checkpoint is downloaded once into `apps/medsam2/model/`",
    ),
    Setting(
        "model_config",
        MODEL,
        Custom(_model_config, "an existing SAM2 model config YAML file"),
        "",
        "the model config; default: the checkpoint's own (MedSAM2's for a file, a URL or `random`)",
        shown_default="the checkpoint's",
    ),
    Setting(
        "finetuned_checkpoint",
        MODEL,
        Custom(_finetuned_checkpoint, "a file path (not a folder)"),
        "",
        "where training publishes its best weights; the inferers serve this file when it exists",
        shown_default="`apps/medsam2/model/medsam2_finetuned.pt`",
    ),
    Setting(
        "adapter",
        MODEL,
        Custom(_adapter, "empty (no adapter) or an adapter name: 1 to 64 letters, digits, '-' or '_'"),
        "",
        "a LoRA adapter served on top of the weights (the published fine-tune if present, else the checkpoint), "
        "merged: `adapters/<name>.pt` beside `finetuned_checkpoint`, written by a `train_parts=lora` run; reloaded "
        "when replaced, base weights alone while it does not exist",
        shown_default="none",
    ),
    Setting(
        "models",
        MODEL,
        Custom(_models, "all or a comma-separated list of " + ", ".join(available_models())),
        "all",
        "the model configs (`lib/configs/<name>.py`) the server serves",
    ),
    Setting(
        "window",
        MODEL,
        Custom(_window, f"{_WINDOWS}, mr, auto, or level,width such as 40,400"),
        "auto",
        f"intensity window: a CT preset ({_WINDOWS}), an explicit `level,width`, `mr` (0.5–99.5 percentile of "
        "non-zero voxels), or `auto` (abdomen window if the image holds HU values ≤ −500, else percentiles)",
    ),
    Setting(
        "labels",
        MODEL,
        Custom(_labels, 'a JSON object without spaces like {"lesion":1,"organ":2} (distinct values 1 to 255)'),
        DEFAULT_LABELS,
        "label names and values (written without spaces: the `monailabel` launcher splits arguments at spaces)",
    ),
    Setting(
        "device",
        MODEL,
        Custom(_device, "auto, cpu, cuda or cuda:<index>"),
        "auto",
        "where the models run; `auto`: CUDA when available, else the CPU",
    ),
    Setting(
        "precision",
        MODEL,
        Choice(("auto", "fp32", "bf16")),
        "auto",
        "`auto`: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 elsewhere",
    ),
    Setting(
        "cpu_tracking",
        MODEL,
        Choice(("fast", "stock")),
        "fast",
        "on a CPU, `fast` runs the memory attention and memory encoder as plain matrix products (same weights; "
        "masks within Dice 0.99 of SAM2's modules, ~1.8× faster tracking; see docs/engine.md#cpu-speed); `stock`: "
        "SAM2's own modules",
    ),
    Setting(
        "cpu_encoder",
        MODEL,
        Choice(("openvino", "torch")),
        "openvino",
        "on a CPU with bf16 (`precision auto`), `openvino` runs the image encoder compiled by OpenVINO (~1.6× faster, "
        "mask Dice 0.996 against fp32; compiled once when the model loads, ~15 s); `torch`: PyTorch's bf16 autocast",
    ),
    Setting(
        "warm_up",
        MODEL,
        Choice(("on", "off")),
        "on",
        "run the model once on a synthetic volume at start (kernels set up, CUDA graphs captured) so the first "
        "request is as fast as the next; `/info` → `warm_up` shows the seconds it took",
    ),
    Setting(
        "encode_ahead",
        MEMORY,
        Choice(("on", "off")),
        "on",
        "encode an image's slices in the background, at low priority, as soon as a viewer opens it (Slicer's "
        "image download, OHIF's series reads through the DICOMweb proxy, a next-sample answer); see "
        "docs/engine.md#encode-ahead",
    ),
    Setting(
        "stop_rule",
        MODEL,
        Custom(_stop_rule, "off, on, or <min object score>,<patience ≥ 1> such as 0,3"),
        "off",
        "stop a propagation where the object ends (`on`: object score < 0 for 3 slices); see docs/engine.md#stop-rule",
    ),
    Setting(
        "tracking_region",
        MODEL,
        Choice(("roi", "full")),
        ByDevice(gpu="full", cpu="roi"),
        "`roi` tracks each label on a square of the cached image features around its key-slice mask plus "
        "`tracking_margin` (no re-encoding; grown, then the whole frame, when a mask reaches its border); `full` "
        "tracks the whole frame, the reference; see docs/engine.md#region-of-interest-tracking",
    ),
    Setting(
        "tracking_margin",
        MODEL,
        Number(float, 0, 1),
        "0.125",
        "the region of interest's margin around the key-slice masks, a fraction of the frame's side (at least one "
        "feature cell: 16 pixels of the model's input)",
    ),
    Setting(
        "tracking_overflow",
        MODEL,
        Choice(("grow", "clip")),
        "grow",
        "what region-of-interest tracking does when a mask reaches the region's border: `grow` tracks the label "
        "again on a region grown by twice the margin, then on the whole frame; `clip` keeps the region and cuts "
        "the mask at its border (for benches with random weights, whose masks fill the frame)",
    ),
    Setting(
        "max_key_slices",
        MODEL,
        Number(int, 0, note="0: all"),
        "4",
        "key slices a tracked slice attends to (the nearest), so that the tenth correction costs what the first does",
    ),
    Setting(
        "local_corrections",
        MODEL,
        Custom(_correction_rule, "off, on, or <slices ≥ 1>,<min Dice in (0, 1]> such as 3,0.9"),
        "on",
        "a correction re-tracks outward from the corrected slice only and stops where its masks agree with the "
        "previous answer (`on`: Dice ≥ 0.9 over 3 consecutive slices); `off`: every correction recomputes the "
        "whole label; see docs/engine.md#local-corrections",
    ),
    Setting(
        "tracking_workers",
        MODEL,
        Number(int, 1, 2),
        "2",
        "on a CPU (with `cpu_tracking fast`), 2 tracks the two directions (and the labels) on two threads of one "
        "core each: 1.3× faster for one or two labels on 2 idle cores, 1.7× on loaded ones "
        "(bench/interactive_latency.py); 1: one after the other",
    ),
    Setting(
        "slices_to_check",
        MODEL,
        Number(int, 0),
        "5",
        "slices named per label in a 3D answer's `check_slices`",
    ),
    Setting(
        "scribble_mode",
        MODEL,
        Choice(("points", "mask")),
        "points",
        "how scribbles reach SAM2: `points` (clicks sampled along the strokes) or `mask` (the strokes as its "
        "previous-mask input); see docs/prompts.md; a request can override it (`scribble_mode`)",
    ),
    Setting(
        "undo_levels",
        MEMORY,
        Number(int, 1),
        "16",
        'requests each annotation session can undo (`"undo": true`); answers are kept compressed',
    ),
    Setting(
        "max_sessions",
        MEMORY,
        Number(int, 1),
        "4",
        "images whose encoded slices the session cache keeps (least recently used dropped first)",
    ),
    Setting(
        "max_session_gb",
        MEMORY,
        Number(float, 0, low_excluded=True, unit="a number of GiB"),
        "6",
        "memory cap of the session cache",
    ),
    Setting(
        "max_voxels",
        MEMORY,
        Number(int, 1),
        str(512 * 512 * 1200),
        "larger images (512×512×1200 by default) are refused up front (HTTP 413)",
    ),
    Setting(
        "encode_batch",
        MEMORY,
        Number(int, 1),
        ByDevice(gpu="16", cpu="4"),
        "slices per image-encoder batch",
    ),
    Setting(
        "max_concurrent_infers",
        MEMORY,
        Number(int, 1),
        ByDevice(gpu=str(DEFAULT_MAX_CONCURRENT), cpu=str(DEFAULT_MAX_CONCURRENT_CPU)),
        "inference requests (`/infer`, and active-learning strategies that run the model) that run at once; on "
        "a GPU one at a time, because the 3D engine captures CUDA graphs that other threads' CUDA work breaks",
    ),
    Setting(
        "max_queued_infers",
        MEMORY,
        Number(int, 0, note="0: no queue"),
        str(DEFAULT_MAX_QUEUED),
        "requests that may wait for a slot, first come first served; one more is refused at once with 503 "
        "and a `Retry-After` header (seconds, estimated from the recent pace)",
    ),
    Setting(
        "queue_timeout_s",
        MEMORY,
        Number(float, 0, low_excluded=True, unit="seconds"),
        f"{DEFAULT_QUEUE_TIMEOUT_S:g}",
        "a request that waited this long in the queue gets 503 and `Retry-After` instead of waiting on",
    ),
    Setting(
        "dicomweb_timeout_s",
        PACS,
        SECONDS_TO_HOUR,
        "30",
        "with `--studies http(s)://…/dicom-web`: connect/read timeout of every PACS request (series search, "
        "download, SEG upload, OHIF's proxied requests); one try, then 503 naming the PACS",
    ),
    Setting(
        "pacs_resend_every_s",
        PACS,
        SECONDS_TO_HOUR,
        "30",
        "how often the server refreshes its view of the PACS and re-sends final labels whose SEG upload failed",
    ),
    Setting(
        "replica_name",
        OPERATIONS,
        Custom(_replica_name, "1 to 64 letters, digits, '.', '_', ':' or '-'"),
        "",
        "this server's name in `/info`, `/metrics`, the `X-Served-By` header and the training lock (replicas: "
        "see docs/scale_out.md)",
        shown_default="`<host name>:<port>`",
    ),
    Setting(
        "allow_untested_monailabel",
        OPERATIONS,
        Custom(_boolean, "true or false"),
        "false",
        "start with a MONAI Label version other than the one the app's patches were tested with (see "
        "docs/monailabel_patches.md); each patch is still checked, and a security patch that cannot apply still "
        "stops the start",
    ),
    Setting(
        "checkpoint_sha256",
        MODEL,
        Custom(_sha256, "empty or 64 hex digits"),
        "",
        "the SHA-256 the checkpoint file must have before its first load (a file or URL checkpoint; known names "
        "carry their own pinned hash); a mismatch stops the start with one line, exit code 2",
        shown_default="the known checkpoint's pinned hash",
    ),
    Setting(
        "auth_audience",
        ACCESS,
        Custom(_audience, "empty or up to 256 characters without spaces"),
        "",
        "with `MONAI_LABEL_AUTH_ENABLE=true`: the audience (`aud` claim) an access token must name",
        shown_default="`MONAI_LABEL_AUTH_CLIENT_ID`",
    ),
    Setting(
        "auth_issuer",
        ACCESS,
        Custom(_url_or_empty, "empty or an http(s):// URL"),
        "",
        "the issuer (`iss` claim) an access token must name",
        shown_default="the `issuer` of the provider's discovery document",
    ),
    Setting(
        "ohif_client_id",
        ACCESS,
        Custom(_audience, "empty or up to 256 characters without spaces"),
        "",
        "with login on: the client id OHIF logs its users in with (a public client of the same OpenID Connect "
        "provider: authorization code with PKCE, redirect URI `<origin>/ohif/callback`); OHIF then sends its own "
        "token to the app and the DICOMweb proxy; empty: OHIF has no login and the viewer asks for an API key",
        shown_default="none",
    ),
    Setting(
        "api_keys_file",
        ACCESS,
        Custom(_file_path, "a file path (not a folder)"),
        "",
        "with login on: the API key file (`scripts/api_keys.py` adds, lists and revokes keys; re-read when it "
        "changes); empty: no API keys",
        shown_default="none",
    ),
    Setting(
        "max_live_sessions",
        ACCESS,
        Number(int, 0, note="0: no cap"),
        "16",
        "annotation sessions (one per viewer and image) the server keeps at once; one more is refused with 429, "
        "`Retry-After` and what to do",
    ),
    Setting(
        "session_idle_timeout_s",
        ACCESS,
        Number(float, 0, unit="seconds", note="0: never"),
        "900",
        "a session without a request or heartbeat (`POST /medsam2/heartbeat`) for this long is dropped, and an "
        "image no session uses any more is freed",
    ),
    Setting(
        "pacs_token_file",
        PACS,
        Custom(_file_path, "a file path (not a folder)"),
        "",
        "a file holding a bearer token for the PACS (sent as `Authorization: Bearer`; re-read when it changes, so "
        "a job can renew it); see docs/pacs.md",
        shown_default="none",
    ),
    Setting(
        "auto_train_after",
        TRAINING,
        Number(int, 0, note="0: off"),
        "0",
        "the N-th final label saved since the last training start starts `medsam2` training by itself",
    ),
    *training_settings(train_options()),
)
SETTINGS_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
TRAIN_KEYS = tuple(o.name for o in train_options())


@dataclass(frozen=True)
class AppSettings:
    """Every ``--conf`` setting, parsed (see :data:`SETTINGS` for what each means)."""

    checkpoint: str
    model_config: Path | None  # None: the checkpoint's own
    finetuned_checkpoint: Path | None  # None: medsam2_finetuned.pt in the app's model folder
    adapter: str  # '': none
    models: tuple[str, ...]
    window: IntensityWindow
    labels: dict[str, int]
    device: str  # "cpu", "cuda" or "cuda:<index>" (auto resolved)
    precision: str
    cpu_tracking: str
    cpu_encoder: str
    warm_up: str
    encode_ahead: str
    stop_rule: StopRule | None
    tracking_region: str
    tracking_margin: float
    tracking_overflow: str
    max_key_slices: int
    local_corrections: CorrectionRule | None
    tracking_workers: int
    slices_to_check: int
    scribble_mode: str
    undo_levels: int
    max_sessions: int
    max_session_gb: float
    max_voxels: int
    encode_batch: int
    max_concurrent_infers: int
    max_queued_infers: int
    queue_timeout_s: float
    dicomweb_timeout_s: float
    pacs_resend_every_s: float
    replica_name: str  # '' : <host name>:<port>
    allow_untested_monailabel: bool
    checkpoint_sha256: str  # '': the known checkpoint's pinned hash, if any
    auth_audience: str  # '': MONAI_LABEL_AUTH_CLIENT_ID
    auth_issuer: str  # '': the discovery document's
    ohif_client_id: str  # '': OHIF without a login of its own
    api_keys_file: str  # '': no API keys
    max_live_sessions: int  # 0: no cap
    session_idle_timeout_s: float  # 0: never
    pacs_token_file: str  # '': no bearer token
    auto_train_after: int
    train: TrainSettings  # the training defaults (a request can override each)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def _unknown_key_message(key: str) -> str:
    known = [s.key for s in SETTINGS]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"Unknown --conf key {key!r}{hint}; the settings are: {', '.join(known)} (see docs/configuration.md)"


def parse_settings(conf: dict[str, Any], cuda_available: bool | None = None) -> AppSettings:
    """Read and check every setting of MONAI Label's ``--conf`` dictionary; SettingError names the first bad one.

    ``cuda_available`` (default: ask torch) resolves ``device auto`` and so the defaults that depend on it."""
    unknown = sorted(k for k in conf if k not in SETTINGS_BY_KEY and k not in MONAI_LABEL_KEYS)
    if unknown:
        raise SettingError(_unknown_key_message(unknown[0]))
    device = SETTINGS_BY_KEY["device"].read(str(conf.get("device", "auto")))
    if device == "auto":
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        device = "cuda" if cuda_available else "cpu"
    device_type = device.split(":")[0]
    values = {s.key: s.read(str(conf[s.key]) if s.key in conf else s.default_text(device_type)) for s in SETTINGS}
    values["device"] = device
    if values["adapter"] and "adapter_name" not in conf:  # lora runs update the served adapter by default
        values["adapter_name"] = values["adapter"]
    train = TrainSettings(**{k: values.pop(k) for k in TRAIN_KEYS})
    return AppSettings(**values, train=train)
