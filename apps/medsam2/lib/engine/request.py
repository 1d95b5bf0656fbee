"""The one place where a request's parameters are read: the dict a viewer sends (Slicer's form, OHIF's panel, the
native form) becomes a :class:`SegmentRequest`, checked once, before any image is read.

What needs the image (slice indices, boxes and clicks inside the slice, strokes) is checked against it by
:func:`lib.engine.prompts.parse_prompts`; everything else is checked here. A value that cannot be used is a
:class:`PromptError` (422) whose message names the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lib.errors import PromptError

if TYPE_CHECKING:
    from lib.engine.label_map import LabelMap

# axis name -> index of the IJK axis the propagation runs along
AXES: dict[str, int] = {"axial": 2, "k": 2, "coronal": 1, "j": 1, "sagittal": 0, "i": 0}
AXIS_NAMES = {2: "axial", 1: "coronal", 0: "sagittal"}
EMPTY_STATE = "empty"  # ``changed_since`` for a client that holds an all-zero label of the image
MAX_ANSWER_ID = 128
MAX_NATIVE_PROMPTS = 256
MAX_POINTS = 1000


@dataclass(frozen=True)
class StopOptions:
    """A request's overrides of the stop rule (None: the server's default)."""

    enabled: bool | None = None
    min_object_score: float | None = None
    patience: int | None = None


@dataclass(frozen=True)
class SegmentRequest:
    """One inference request, typed. ``dimension`` is 2 (one slice) or 3 (propagation); ``labels`` the label map
    its label names resolve in (the settings' map unless the task passes the image's own)."""

    dimension: int
    labels: LabelMap
    session_name: str = "default"  # ``annotation_session`` or ``client_id``: whose session on the image
    history_step: str | None = None  # "undo" or "redo"
    changed_since: str | None = None  # an earlier ``answer_id``, or "empty": answer the changed region only
    # the prompts, in one of two forms (checked against the image by lib.engine.prompts.parse_prompts)
    native_prompts: tuple[dict[str, Any], ...] = ()  # native form: {label, slice, box, clicks, strokes} entries
    label: Any = None  # viewer form: the label named (name or value)
    foreground: tuple[tuple[float, float, float], ...] = ()  # viewer form: IJK clicks
    background: tuple[tuple[float, float, float], ...] = ()
    roi: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None  # viewer form: sorted IJK pairs
    key_slice: int | None = None  # 2D viewer form: the slice the viewer shows (``slice``)
    target_label: Any = None  # the label scribbles refine: Slicer's ``selected_label_name``, else ``label``
    axis: int | None = None  # IJK axis of propagation; None: not sent (axial, or the axis scribbles were painted on)
    slice_range: tuple[int, int] | None = None  # native form, 3D: [first, last] along the axis, not yet checked
    refine_last: bool = False  # ``refine_from: "last"``: refine the session's current answer
    scribble_mode: str | None = None  # None: the server's setting
    stop: StopOptions = field(default_factory=StopOptions)
    correction: bool = False
    reset_state: bool = False
    tracking_region: str | None = None  # 3D: "roi" or "full"; None: the server's setting (tracking_region)

    @property
    def propagation_axis(self) -> int:
        return 2 if self.axis is None else self.axis

    @property
    def sends_prompts(self) -> bool:
        """Whether the request carries prompts of its own (besides scribbles painted into an uploaded label)."""
        return bool(self.native_prompts or self.foreground or self.background)

    def with_labels(self, labels: LabelMap | None) -> SegmentRequest:
        return self if labels is None else replace(self, labels=labels)


def parse_segment_request(request: Any, dimension: int, labels: LabelMap) -> SegmentRequest:
    """Read and check a request's parameters (see the module docstring)."""
    if not isinstance(request, dict):
        raise PromptError("The request parameters must be a JSON object.")
    native = _native_prompts(request.get("prompts"))
    viewer: dict[str, Any] = {}
    if not native:
        viewer = {
            "foreground": _ijk_points(request.get("foreground"), "foreground"),
            "background": _ijk_points(request.get("background"), "background"),
            "roi": parse_roi(request.get("roi")),
        }
    if dimension == 2 and request.get("slice") not in (None, ""):
        viewer["key_slice"] = int_index(request["slice"], "slice")
    three_d: dict[str, Any] = {}
    if dimension == 3:
        three_d = {
            "axis": None if request.get("axis") in (None, "") else parse_axis(request["axis"]),
            "slice_range": _slice_range(request.get("slice_range")) if native else None,
            "stop": parse_stop_options(request),
            "correction": bool(parse_flag(request.get("correction"), "correction")),
            "reset_state": bool(parse_flag(request.get("reset_state"), "reset_state")),
            "tracking_region": _tracking_region(request.get("tracking_region")),
        }
    return SegmentRequest(
        dimension=dimension,
        labels=labels,
        session_name=str(request.get("annotation_session") or request.get("client_id") or "default"),
        history_step=_history_step(request),
        changed_since=_changed_since(request.get("changed_since")),
        native_prompts=native,
        label=request.get("label"),
        target_label=request.get("selected_label_name") or request.get("label"),
        refine_last=str(request.get("refine_from") or "").strip().lower() == "last",
        scribble_mode=str(request["scribble_mode"]) if request.get("scribble_mode") else None,
        **viewer,
        **three_d,
    )


# --- values ----------------------------------------------------------------------------------------------------


def number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PromptError(f"{what} must be a number, got {value!r}.")
    try:
        parsed = float(value)
    except ValueError:
        raise PromptError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(parsed):
        raise PromptError(f"{what} must be a finite number, got {value!r}.")
    return parsed


def int_index(value: Any, what: str) -> int:
    parsed = number(value, what)
    if abs(parsed) > 1e9:
        raise PromptError(f"{what} is out of range ({value!r}).")
    return int(round(parsed))


def point_list(value: Any, dims: int, what: str) -> list[list[float]]:
    if value is None or value == "":
        return []
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"{what} must be a list of points, each [{', '.join('ijk'[:dims] if dims == 3 else 'xy')}].")
    if len(value) > MAX_POINTS:
        raise PromptError(f"{what} has {len(value)} points; at most {MAX_POINTS} are accepted.")
    points = []
    for n, p in enumerate(value):
        if not isinstance(p, (list, tuple)) or len(p) != dims:
            raise PromptError(f"{what}[{n}] must be a list of {dims} numbers, got {p!r}.")
        points.append([number(c, f"{what}[{n}]") for c in p])
    return points


def _ijk_points(value: Any, what: str) -> tuple[tuple[float, float, float], ...]:
    return tuple((i, j, k) for i, j, k in point_list(value, 3, what))


def parse_flag(value: Any, what: str) -> bool | None:
    """true/false, 1/0, yes/no, on/off (as JSON or text); None when not given."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise PromptError(f"{what} must be true or false, got {value!r}.")


def parse_axis(value: Any) -> int:
    if value is None or value == "":
        return 2
    name = str(value).strip().lower()
    if name not in AXES:
        raise PromptError(f"Unknown axis {value!r}: use one of axial, coronal, sagittal.")
    return AXES[name]


def parse_roi(value: Any) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """Slicer's IJK ``roi`` [i0, i1, j0, j1, k0, k1] as sorted (i, j, k) pairs (each pair may come reversed)."""
    if value is None or value == "" or value == []:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise PromptError(f"'roi' must be [i0, i1, j0, j1, k0, k1] in voxel indices, got {value!r}.")
    nums = [int_index(v, "roi") for v in value]
    i, j, k = (tuple(sorted(nums[a : a + 2])) for a in (0, 2, 4))
    return i, j, k  # type: ignore[return-value]


def parse_stop_options(request: dict[str, Any]) -> StopOptions:
    """``stop_rule`` (true/false), ``stop_min_object_score`` (a logit), ``stop_patience`` (slices, 1-1000)."""
    score = request.get("stop_min_object_score")
    patience = request.get("stop_patience")
    if patience not in (None, ""):
        patience = int_index(patience, "stop_patience")
        if not 1 <= patience <= 1000:
            raise PromptError(f"stop_patience must be between 1 and 1000 slices, got {patience}.")
    if score not in (None, ""):
        score = number(score, "stop_min_object_score")
        if abs(score) > 100:
            raise PromptError(f"stop_min_object_score is a logit between -100 and 100, got {score}.")
    return StopOptions(
        parse_flag(request.get("stop_rule"), "stop_rule"),
        None if score in (None, "") else score,
        None if patience in (None, "") else patience,
    )


def _native_prompts(raw: Any) -> tuple[dict[str, Any], ...]:
    if raw in (None, "", []):
        return ()
    if not isinstance(raw, list):
        raise PromptError("'prompts' must be a list of {label, slice, box, foreground, background} objects.")
    if len(raw) > MAX_NATIVE_PROMPTS:
        raise PromptError(f"'prompts' has {len(raw)} entries; at most {MAX_NATIVE_PROMPTS} are accepted.")
    for n, item in enumerate(raw):
        if not isinstance(item, dict):
            raise PromptError(f"prompts[{n}] must be an object, got {item!r}.")
    return tuple(raw)


def _tracking_region(value: Any) -> str | None:
    """``tracking_region``: "roi" (refused with 422 where no region can be formed) or "full"; None: not sent."""
    if value in (None, ""):
        return None
    text = str(value).strip().lower()
    if text not in ("roi", "full"):
        raise PromptError(f"tracking_region must be roi or full, got {value!r}.")
    return text


def _slice_range(value: Any) -> tuple[int, int] | None:
    """The native ``slice_range`` [first, last] (inclusive, sorted); checked against the image later."""
    if value is None or value == "" or value == []:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PromptError(f"'slice_range' must be [first, last] slice indices, got {value!r}.")
    lo, hi = sorted(int_index(v, "slice_range") for v in value)
    return lo, hi


def _history_step(request: dict[str, Any]) -> str | None:
    """ "undo" or "redo" when the request asks for one (PromptError for both or a value that is not a flag)."""
    undo, redo = parse_flag(request.get("undo"), "undo"), parse_flag(request.get("redo"), "redo")
    if undo and redo:
        raise PromptError("Send undo or redo, not both.")
    return "undo" if undo else "redo" if redo else None


def _changed_since(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_ANSWER_ID or not value.isprintable():
        raise PromptError(
            f'changed_since must be the answer_id of an earlier answer in this session, or "{EMPTY_STATE}" '
            f"(a client that holds an all-zero label), got {str(value)[:80]!r}."
        )
    return value
