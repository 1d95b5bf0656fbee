"""Typed prompts and the one place where viewer requests are parsed and validated.

Volumes are held as numpy arrays in (k, j, i) order (SimpleITK's order), where (i, j, k) are the
IJK voxel indices that Slicer and OHIF send. A slice along an axis is a 2D array whose columns are
the "x" and rows the "y" pixel coordinates SAM2 uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lib.engine.label_map import LabelMap as LabelMap  # noqa: F401  (re-exported)
from lib.engine.mask_prompts import Strokes, parse_strokes
from lib.engine.request import AXES as AXES  # noqa: F401  (re-exported: where the axis names were defined)
from lib.engine.request import AXIS_NAMES, SegmentRequest, int_index, number, parse_segment_request, point_list
from lib.engine.request import parse_stop_options as parse_stop_options  # noqa: F401  (re-exported)
from lib.errors import PromptError

STROKE_KINDS = ("foreground_scribbles", "background_scribbles", "foreground_lasso", "background_lasso")


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


def parse_request(
    request: dict[str, Any], volume_shape_kji: Sequence[int], labels: LabelMap, dimension: int
) -> ParsedRequest:
    """Validate a request dict (Slicer/OHIF form or the native ``prompts`` form) into typed prompts: the request
    read by :func:`lib.engine.request.parse_segment_request`, its prompts checked by :func:`parse_prompts`."""
    return parse_prompts(parse_segment_request(request, dimension, labels), volume_shape_kji)


def parse_prompts(request: SegmentRequest, volume_shape_kji: Sequence[int], axis: int | None = None) -> ParsedRequest:
    """A typed request's prompts on the image: slices, boxes and clicks checked against its shape.

    ``axis`` overrides the request's (the axis scribbles were painted on); 2D requests are always axial.
    """
    if request.dimension == 2:
        axis = 2
    elif axis is None:
        axis = request.propagation_axis
    if request.native_prompts:
        parsed = _parse_native(request.native_prompts, volume_shape_kji, request.labels, axis)
        if request.dimension == 3:
            parsed.slice_range = check_slice_range(request.slice_range, slice_shape(volume_shape_kji, axis)[0], axis)
    else:
        parsed = _parse_viewer(request, volume_shape_kji, axis)
    if request.dimension == 2:
        slices = {p.slice_index for p in parsed.prompts}
        if len(slices) > 1:
            raise PromptError(f"The 2D model segments one slice per request; prompts name slices {sorted(slices)}.")
    return parsed


def _parse_native(raw: Sequence[dict[str, Any]], shape: Sequence[int], labels: LabelMap, axis: int) -> ParsedRequest:
    n_slices, rows, cols = slice_shape(shape, axis)
    notes: list[str] = []
    prompts = []
    for n, item in enumerate(raw):
        name, value = labels.resolve(item.get("label"))
        if item.get("slice") is None:
            raise PromptError(f"prompts[{n}] has no 'slice'.")
        index = _check_slice(int_index(item["slice"], f"prompts[{n}].slice"), n_slices, axis)
        box = None
        if item.get("box") is not None:
            raw_box = item["box"]
            if not isinstance(raw_box, (list, tuple)) or len(raw_box) != 4:
                raise PromptError(f"prompts[{n}].box must be [x0, y0, x1, y1] in pixels, got {raw_box!r}.")
            box = _validate_box([number(c, f"prompts[{n}].box") for c in raw_box], rows, cols, notes)
        fg = point_list(item.get("foreground"), 2, f"prompts[{n}].foreground")
        bg = point_list(item.get("background"), 2, f"prompts[{n}].background")
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


def check_slice_range(value: tuple[int, int] | None, n_slices: int, axis: int) -> tuple[int, int] | None:
    """The request's ``slice_range`` (sorted), refused when it does not lie inside the image along ``axis``."""
    if value is None:
        return None
    lo, hi = value
    if lo < 0 or hi > n_slices - 1:
        raise PromptError(
            f"slice_range [{lo}, {hi}] is outside the image: its {AXIS_NAMES[axis]} axis has {n_slices} slices "
            f"(0..{n_slices - 1}). Send a range inside it."
        )
    return lo, hi


Roi = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _roi_on_slices(roi: Roi, n_slices: int, axis: int) -> tuple[tuple, tuple, tuple[int, int]]:
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


def roi_slice_range(roi: Roi | None, volume_shape_kji: Sequence[int], axis: int) -> tuple[int, int] | None:
    """The slices along ``axis`` that a parsed IJK ``roi`` spans, clipped to the image."""
    if roi is None:
        return None
    n_slices = slice_shape(volume_shape_kji, axis)[0]
    _, _, (first, last) = _roi_on_slices(roi, n_slices, axis)
    return max(first, 0), min(last, n_slices - 1)


def _parse_viewer(request: SegmentRequest, shape: Sequence[int], axis: int) -> ParsedRequest:
    """Slicer / OHIF form: IJK ``foreground``/``background``, optional IJK ``roi``, ``slice`` (2D)."""
    name, value = request.labels.resolve(request.label)
    n_slices, rows, cols = slice_shape(shape, axis)
    notes: list[str] = []
    roi = request.roi
    if roi is None and not request.foreground and not request.background:
        raise PromptError(
            "No prompt was sent: place a box (ROI) around the object or add at least one foreground click."
        )
    roi_slices = None
    box = None
    if roi is not None:
        lo, hi, roi_slices = _roi_on_slices(roi, n_slices, axis)
        box = _validate_box((lo[1], lo[2], hi[1], hi[2]), rows, cols, notes)
    points_by_slice: dict[int, list[tuple[float, float, int]]] = {}
    for pts, lab, what in ((request.foreground, 1, "foreground"), (request.background, 0, "background")):
        for p in pts:
            s, x, y = ijk_to_slice(p, axis)
            s = int(round(s))
            _check_slice(s, n_slices, axis, f"{what} point {list(p)} lies on slice")
            _check_point(x, y, rows, cols, f"{what} point {list(p)}")
            points_by_slice.setdefault(s, []).append((x, y, lab))
    if request.dimension == 2:
        key = _key_slice_2d(request.key_slice, roi_slices, points_by_slice, n_slices, axis, notes)
        on_key = points_by_slice.get(key, [])
        dropped = sum(len(v) for s, v in points_by_slice.items() if s != key)
        if dropped:
            notes.append(f"{dropped} click(s) on other slices than {key} were ignored")
        if box is None and not any(lab == 1 for _, _, lab in on_key):
            raise PromptError(f"No box and no foreground click on slice {key}: add a box or a click on this slice.")
        return ParsedRequest([_make_prompt(name, value, key, box, on_key)], axis, None, notes)
    return _viewer_3d(name, value, box, roi_slices, points_by_slice, n_slices, axis, notes)


def _viewer_3d(
    name: str,
    value: int,
    box: tuple[float, float, float, float] | None,
    roi_slices: tuple[int, int] | None,
    points_by_slice: dict[int, list[tuple[float, float, int]]],
    n_slices: int,
    axis: int,
    notes: list[str],
) -> ParsedRequest:
    """3D: the slice with clicks is a key slice; with an ROI and no clicks, the ROI's middle slice."""
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
    key: int | None,
    roi_slices: tuple[int, int] | None,
    points_by_slice: dict[int, list],
    n_slices: int,
    axis: int,
    notes: list[str],
) -> int:
    if key is not None:
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
