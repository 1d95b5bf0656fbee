"""Typed prompts and the one place where viewer requests are parsed and validated.

Volumes are held as numpy arrays in (k, j, i) order (SimpleITK's order), where (i, j, k) are the
IJK voxel indices that Slicer and OHIF send. A slice along an axis is a 2D array whose columns are
the "x" and rows the "y" pixel coordinates SAM2 uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lib.engine.mask_prompts import Strokes, parse_strokes
from lib.errors import PromptError

STROKE_KINDS = ("foreground_scribbles", "background_scribbles", "foreground_lasso", "background_lasso")

# axis name -> index of the IJK axis the propagation runs along
AXES: dict[str, int] = {"axial": 2, "k": 2, "coronal": 1, "j": 1, "sagittal": 0, "i": 0}
AXIS_NAMES = {2: "axial", 1: "coronal", 0: "sagittal"}


@dataclass(frozen=True)
class KeySlicePrompt:
    """One label's prompt on one slice: an optional box and clicks, in the slice's pixel coordinates."""

    label: str
    label_value: int
    slice_index: int
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 (x = column)
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()  # 1 foreground, 0 background
    strokes: Strokes = field(default_factory=Strokes, compare=False)  # scribbles and lassos, as drawn
    # set by :func:`lib.engine.mask_prompts.resolve_drawn`: a mask prompt, or (``mask_is_prior``) the mask the
    # clicks refine; lasso edits (+1 add, -1 remove) applied pixel-exact to the slice's mask
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask_is_prior: bool = False
    edits: np.ndarray | None = field(default=None, compare=False, repr=False)

    def has_clicks_or_box(self) -> bool:
        return self.box is not None or bool(self.points)

    def as_json(self, axis: int) -> dict[str, Any]:
        out = {
            "label": self.label,
            "label_value": self.label_value,
            "axis": AXIS_NAMES[axis],
            "slice": self.slice_index,
            "box": list(self.box) if self.box else None,
            "foreground": [list(p) for p, lab in zip(self.points, self.point_labels, strict=False) if lab == 1],
            "background": [list(p) for p, lab in zip(self.points, self.point_labels, strict=False) if lab == 0],
        }
        for kind in STROKE_KINDS:
            drawn = getattr(self.strokes, kind)
            if drawn:
                out[kind] = [s.tolist() for s in drawn]
        if self.mask is not None:
            out["mask"] = {"pixels": int(self.mask.sum()), "role": "prior" if self.mask_is_prior else "prompt"}
        return out


@dataclass
class ParsedRequest:
    """Prompts plus request-level options, after validation."""

    prompts: list[KeySlicePrompt]
    axis: int = 2
    slice_range: tuple[int, int] | None = None  # inclusive bounds along the axis (3D only)
    notes: list[str] = field(default_factory=list)


def slice_shape(volume_shape_kji: Sequence[int], axis: int) -> tuple[int, int, int]:
    """(number of slices, rows, columns) when a (k, j, i) volume is cut along IJK ``axis``."""
    k, j, i = volume_shape_kji
    return {2: (k, j, i), 1: (j, k, i), 0: (i, k, j)}[axis]


def ijk_to_slice(point: Sequence[float], axis: int) -> tuple[float, float, float]:
    """IJK point -> (slice index, x, y) for slices cut along ``axis``."""
    i, j, k = point
    return {2: (k, i, j), 1: (j, i, k), 0: (i, j, k)}[axis]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PromptError(f"{what} must be a number, got {value!r}.")
    try:
        number = float(value)
    except ValueError:
        raise PromptError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise PromptError(f"{what} must be a finite number, got {value!r}.")
    return number


def _int_index(value: Any, what: str) -> int:
    number = _number(value, what)
    if abs(number) > 1e9:
        raise PromptError(f"{what} is out of range ({value!r}).")
    return int(round(number))


def _point_list(value: Any, dims: int, what: str) -> list[list[float]]:
    if value is None or value == "":
        return []
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"{what} must be a list of points, each [{', '.join('ijk'[:dims] if dims == 3 else 'xy')}].")
    if len(value) > 1000:
        raise PromptError(f"{what} has {len(value)} points; at most 1000 are accepted.")
    points = []
    for n, p in enumerate(value):
        if not isinstance(p, (list, tuple)) or len(p) != dims:
            raise PromptError(f"{what}[{n}] must be a list of {dims} numbers, got {p!r}.")
        points.append([_number(c, f"{what}[{n}]") for c in p])
    return points


class LabelMap:
    """The task's labels (name -> value); resolves what a request names, by name or by value."""

    def __init__(self, labels: dict[str, int]):
        if not labels:
            raise ValueError("at least one label is needed")
        self.by_name = {str(k): int(v) for k, v in labels.items()}
        self.by_value = {v: k for k, v in self.by_name.items()}

    @property
    def default(self) -> str:
        return next(iter(self.by_name))

    def resolve(self, label: Any) -> tuple[str, int]:
        if label is None or label == "":
            name = self.default
            return name, self.by_name[name]
        if isinstance(label, str) and label in self.by_name:
            return label, self.by_name[label]
        if isinstance(label, str):
            lowered = {k.lower(): k for k in self.by_name}
            if label.lower() in lowered:
                name = lowered[label.lower()]
                return name, self.by_name[name]
        if isinstance(label, (int, str)) and not isinstance(label, bool):
            try:
                value = int(label)
            except ValueError:
                value = None
            if value in self.by_value:
                return self.by_value[value], value
        known = ", ".join(f"{k} ({v})" for k, v in self.by_name.items())
        raise PromptError(
            f"Unknown label {label!r}. This model is configured with the labels: {known}. "
            f"Rename the segment to one of these, or start the server with --conf labels '{{\"name\":1,...}}' "
            "(no spaces: the monailabel launcher splits arguments at them)."
        )


def _check_slice(index: int, n_slices: int, axis: int, what: str = "slice") -> int:
    if not 0 <= index < n_slices:
        raise PromptError(
            f"{what} {index} is outside the image: the {AXIS_NAMES[axis]} axis has slices 0..{n_slices - 1}."
        )
    return index


def _validate_box(box: Sequence[float], rows: int, cols: int, notes: list[str]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    if x1 < 0 or y1 < 0 or x0 > cols - 1 or y0 > rows - 1:
        raise PromptError(
            f"The box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] lies outside the image slice "
            f"(columns 0..{cols - 1}, rows 0..{rows - 1}). Draw the box over the image."
        )
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, cols - 1.0), min(y1, rows - 1.0))
    if clipped != (x0, y0, x1, y1):
        notes.append(f"box clipped to the image: {list(clipped)}")
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        raise PromptError(
            f"The box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] has zero width or height inside the image. "
            f"Draw a box that covers the object."
        )
    return clipped


def _check_point(x: float, y: float, rows: int, cols: int, what: str) -> None:
    if not (0 <= x <= cols - 1 and 0 <= y <= rows - 1):
        raise PromptError(
            f"{what} ({x:g}, {y:g}) is outside the image slice (columns 0..{cols - 1}, rows 0..{rows - 1})."
        )


def parse_axis(value: Any) -> int:
    if value is None or value == "":
        return 2
    name = str(value).strip().lower()
    if name not in AXES:
        raise PromptError(f"Unknown axis {value!r}: use one of axial, coronal, sagittal.")
    return AXES[name]


@dataclass(frozen=True)
class StopOptions:
    """A request's overrides of the stop rule (None: the server's default)."""

    enabled: bool | None = None
    min_object_score: float | None = None
    patience: int | None = None


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


def parse_stop_options(request: dict[str, Any]) -> StopOptions:
    """``stop_rule`` (true/false), ``stop_min_object_score`` (a logit), ``stop_patience`` (slices, 1-1000)."""
    score = request.get("stop_min_object_score")
    patience = request.get("stop_patience")
    if patience not in (None, ""):
        patience = _int_index(patience, "stop_patience")
        if not 1 <= patience <= 1000:
            raise PromptError(f"stop_patience must be between 1 and 1000 slices, got {patience}.")
    if score not in (None, ""):
        score = _number(score, "stop_min_object_score")
        if abs(score) > 100:
            raise PromptError(f"stop_min_object_score is a logit between -100 and 100, got {score}.")
    return StopOptions(
        parse_flag(request.get("stop_rule"), "stop_rule"),
        None if score in (None, "") else score,
        None if patience in (None, "") else patience,
    )


def parse_request(
    request: dict[str, Any], volume_shape_kji: Sequence[int], labels: LabelMap, dimension: int
) -> ParsedRequest:
    """Validate a request (Slicer/OHIF form or the native ``prompts`` form) into typed prompts.

    ``dimension`` is 2 for the 2D task (one slice, ``slice`` chosen by the viewer) or 3.
    """
    if not isinstance(request, dict):
        raise PromptError("The request parameters must be a JSON object.")
    axis = parse_axis(request.get("axis")) if dimension == 3 else 2
    if request.get("prompts") not in (None, "", []):
        parsed = _parse_native(request["prompts"], volume_shape_kji, labels, axis)
        if dimension == 3:
            parsed.slice_range = parse_slice_range(
                request.get("slice_range"), slice_shape(volume_shape_kji, axis)[0], axis
            )
    else:
        parsed = _parse_viewer(request, volume_shape_kji, labels, axis, dimension)
    if dimension == 2:
        slices = {p.slice_index for p in parsed.prompts}
        if len(slices) > 1:
            raise PromptError(f"The 2D model segments one slice per request; prompts name slices {sorted(slices)}.")
    return parsed


def _parse_native(raw: Any, shape: Sequence[int], labels: LabelMap, axis: int) -> ParsedRequest:
    if not isinstance(raw, list):
        raise PromptError("'prompts' must be a list of {label, slice, box, foreground, background} objects.")
    if len(raw) > 256:
        raise PromptError(f"'prompts' has {len(raw)} entries; at most 256 are accepted.")
    n_slices, rows, cols = slice_shape(shape, axis)
    notes: list[str] = []
    prompts = []
    for n, item in enumerate(raw):
        if not isinstance(item, dict):
            raise PromptError(f"prompts[{n}] must be an object, got {item!r}.")
        name, value = labels.resolve(item.get("label"))
        if item.get("slice") is None:
            raise PromptError(f"prompts[{n}] has no 'slice'.")
        index = _check_slice(_int_index(item["slice"], f"prompts[{n}].slice"), n_slices, axis)
        box = None
        if item.get("box") is not None:
            raw_box = item["box"]
            if not isinstance(raw_box, (list, tuple)) or len(raw_box) != 4:
                raise PromptError(f"prompts[{n}].box must be [x0, y0, x1, y1] in pixels, got {raw_box!r}.")
            box = _validate_box([_number(c, f"prompts[{n}].box") for c in raw_box], rows, cols, notes)
        fg = _point_list(item.get("foreground"), 2, f"prompts[{n}].foreground")
        bg = _point_list(item.get("background"), 2, f"prompts[{n}].background")
        for x, y in fg + bg:
            _check_point(x, y, rows, cols, f"prompts[{n}] point")
        strokes = Strokes(
            **{
                kind: parse_strokes(item.get(kind), rows, cols, f"prompts[{n}].{kind}", "lasso" in kind)
                for kind in STROKE_KINDS
            }
        )
        if box is None and not fg and not bg and strokes.is_empty():
            raise PromptError(f"prompts[{n}] has no box, clicks, scribbles or lasso.")
        points = tuple((x, y) for x, y in fg + bg)
        labels_ = tuple([1] * len(fg) + [0] * len(bg))
        prompts.append(KeySlicePrompt(name, value, index, box, points, labels_, strokes))
    return ParsedRequest(prompts, axis, None, notes)


def parse_slice_range(value: Any, n_slices: int, axis: int) -> tuple[int, int] | None:
    """The native ``slice_range`` [first, last] (inclusive slice indices along the axis); None when not given."""
    if value is None or value == "" or value == []:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PromptError(f"'slice_range' must be [first, last] slice indices, got {value!r}.")
    lo, hi = sorted(_int_index(v, "slice_range") for v in value)
    _check_slice(lo, n_slices, axis, "slice_range starts at slice")
    _check_slice(hi, n_slices, axis, "slice_range ends at slice")
    return lo, hi


def _roi_on_slices(roi: list[tuple[int, int]], n_slices: int, axis: int) -> tuple[tuple, tuple, tuple[int, int]]:
    """A parsed ROI's two corners as (slice, x, y) and the slices it spans (not clipped); PromptError if it lies
    outside the image."""
    (i0, i1), (j0, j1), (k0, k1) = roi
    lo, hi = ijk_to_slice((i0, j0, k0), axis), ijk_to_slice((i1, j1, k1), axis)
    first, last = int(min(lo[0], hi[0])), int(max(lo[0], hi[0]))
    if last < 0 or first > n_slices - 1:
        raise PromptError(
            f"The ROI spans slices {first}..{last}, outside the image "
            f"(slices 0..{n_slices - 1}). Place the ROI over the image."
        )
    return lo, hi, (first, last)


def roi_slice_range(value: Any, volume_shape_kji: Sequence[int], axis: int) -> tuple[int, int] | None:
    """The slices along ``axis`` that an IJK ``roi`` [i0, i1, j0, j1, k0, k1] spans, clipped to the image."""
    roi = _parse_roi(value)
    if roi is None:
        return None
    n_slices = slice_shape(volume_shape_kji, axis)[0]
    _, _, (first, last) = _roi_on_slices(roi, n_slices, axis)
    return max(first, 0), min(last, n_slices - 1)


def _parse_roi(value: Any) -> list[tuple[int, int]] | None:
    if value is None or value == "" or value == []:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise PromptError(f"'roi' must be [i0, i1, j0, j1, k0, k1] in voxel indices, got {value!r}.")
    nums = [_int_index(v, "roi") for v in value]
    return [tuple(sorted(nums[a : a + 2])) for a in (0, 2, 4)]  # type: ignore[misc]


def _parse_viewer(
    request: dict[str, Any], shape: Sequence[int], labels: LabelMap, axis: int, dimension: int
) -> ParsedRequest:
    """Slicer / OHIF form: IJK ``foreground``/``background``, optional IJK ``roi``, ``slice`` (2D)."""
    name, value = labels.resolve(request.get("label"))
    n_slices, rows, cols = slice_shape(shape, axis)
    notes: list[str] = []
    fg = _point_list(request.get("foreground"), 3, "foreground")
    bg = _point_list(request.get("background"), 3, "background")
    roi = _parse_roi(request.get("roi"))
    if roi is None and not fg and not bg:
        raise PromptError(
            "No prompt was sent: place a box (ROI) around the object or add at least one foreground click."
        )
    roi_slices = None
    box = None
    if roi is not None:
        lo, hi, roi_slices = _roi_on_slices(roi, n_slices, axis)
        box = _validate_box((lo[1], lo[2], hi[1], hi[2]), rows, cols, notes)
    points_by_slice: dict[int, list[tuple[float, float, int]]] = {}
    for pts, lab, what in ((fg, 1, "foreground"), (bg, 0, "background")):
        for p in pts:
            s, x, y = ijk_to_slice(p, axis)
            s = int(round(s))
            _check_slice(s, n_slices, axis, f"{what} point {p} lies on slice")
            _check_point(x, y, rows, cols, f"{what} point {p}")
            points_by_slice.setdefault(s, []).append((x, y, lab))

    if dimension == 2:
        key = _key_slice_2d(request.get("slice"), roi_slices, points_by_slice, n_slices, axis, notes)
        on_key = points_by_slice.get(key, [])
        dropped = sum(len(v) for s, v in points_by_slice.items() if s != key)
        if dropped:
            notes.append(f"{dropped} click(s) on other slices than {key} were ignored")
        if box is None and not any(lab == 1 for _, _, lab in on_key):
            raise PromptError(f"No box and no foreground click on slice {key}: add a box or a click on this slice.")
        prompt = _make_prompt(name, value, key, box, on_key)
        return ParsedRequest([prompt], axis, None, notes)

    # 3D: the slice with clicks is a key slice; with an ROI and no clicks, the ROI's middle slice.
    slice_range = None
    if roi_slices is not None:
        slice_range = (max(roi_slices[0], 0), min(roi_slices[1], n_slices - 1))
    prompts = []
    if points_by_slice:
        for s in sorted(points_by_slice):
            on_slice = points_by_slice[s]
            if not any(lab == 1 for _, _, lab in on_slice) and box is None:
                raise PromptError(f"Slice {s} has only background clicks: add a foreground click or a box.")
            use_box = box if slice_range is None or slice_range[0] <= s <= slice_range[1] else None
            prompts.append(_make_prompt(name, value, s, use_box, on_slice))
    else:
        assert slice_range is not None
        middle = (slice_range[0] + slice_range[1]) // 2
        prompts.append(_make_prompt(name, value, middle, box, []))
    return ParsedRequest(prompts, axis, slice_range, notes)


def _key_slice_2d(
    raw: Any,
    roi_slices: tuple[int, int] | None,
    points_by_slice: dict[int, list],
    n_slices: int,
    axis: int,
    notes: list[str],
) -> int:
    if raw is not None and raw != "":
        key = _int_index(raw, "slice")
        if roi_slices is not None and not roi_slices[0] <= key <= roi_slices[1]:
            # Slicer 0.8.5 sends the slice *offset in mm* as `slice` for an ROI without clicks.
            middle = min(max((roi_slices[0] + roi_slices[1]) // 2, 0), n_slices - 1)
            notes.append(f"slice {key} is outside the ROI (slices {roi_slices[0]}..{roi_slices[1]}); used {middle}")
            key = middle
        return _check_slice(key, n_slices, axis)
    if roi_slices is not None:
        return min(max((roi_slices[0] + roi_slices[1]) // 2, 0), n_slices - 1)
    fg_slices = [s for s, pts in points_by_slice.items() if any(lab == 1 for _, _, lab in pts)]
    if len(fg_slices) == 1:
        return fg_slices[0]
    raise PromptError("The 2D model needs 'slice' when clicks lie on several slices.")


def _make_prompt(
    name: str, value: int, index: int, box: tuple[float, float, float, float] | None, points: list
) -> KeySlicePrompt:
    return KeySlicePrompt(
        name,
        value,
        index,
        box,
        tuple((x, y) for x, y, _ in points),
        tuple(lab for _, _, lab in points),
    )
