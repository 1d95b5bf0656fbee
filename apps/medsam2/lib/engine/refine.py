"""Refining a label that already exists: which slices a request may change, and how the answer is composed.

A refine request starts from a base label (a saved final or original label, a label tag, an uploaded label, or the
session's last answer) and adds prompts on key slices. For each label the request names:
- its *range* is the request's ROI or ``slice_range``; without one, only the key slices when the base already holds
  the label (the rest was accepted), the whole axis when it does not (a new label: nothing to keep);
- inside the range, key slices take the new prompt (clicks refine the base's mask there, a box replaces it) and every
  other slice is recomputed by propagation, which starts from the key slices and from the base's slices just
  outside the range (as mask prompts, so the recomputed slices join what was accepted);
- outside the range, and for every label the request does not name, the base is returned voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lib.engine.mask_prompts import Strokes
from lib.engine.prompts import KeySlicePrompt, LabelMap
from lib.errors import PromptError

MAX_PAINTED_KEY_SLICES = 64
FOREGROUND_SCRIBBLES = "foreground_scribbles"  # the segment names Slicer's MONAI Label plugin paints scribbles into
BACKGROUND_SCRIBBLES = "background_scribbles"
# MONAI Label's scribbles convention when no label_info names the values (monailabel.scribbles.transforms)
DEFAULT_SCRIBBLE_VALUES = {"label": 1, BACKGROUND_SCRIBBLES: 2, FOREGROUND_SCRIBBLES: 3}


@dataclass(frozen=True)
class LabelFile:
    """A label file a request starts from: an upload or a datastore label (``source`` says which)."""

    path: str
    source: str
    label_info: object = None  # Slicer's [{"name": segment name, "id": value}, ...]
    scribbles_convention: bool = False  # values without label_info follow DEFAULT_SCRIBBLE_VALUES


@dataclass
class DecodedLabel:
    """An uploaded or saved label volume read as a base label and painted scribbles (frames along the axis)."""

    base: BaseLabel | None
    source: str
    foreground: np.ndarray | None = None
    background: np.ndarray | None = None

    @property
    def has_scribbles(self) -> bool:
        return any(m is not None and m.any() for m in (self.foreground, self.background))


@dataclass
class BaseLabel:
    """A label map in the app's label values, as frames (n, rows, cols) along the session's axis."""

    frames: np.ndarray
    source: str

    def slice_mask(self, value: int, index: int) -> np.ndarray:
        return self.frames[index] == value

    def holds(self, value: int) -> bool:
        return bool((self.frames == value).any())

    def without(self, values: Iterable[int]) -> BaseLabel | None:
        """The base with these labels cleared (None when nothing is left)."""
        frames = self.frames.copy()
        frames[np.isin(frames, list(values))] = 0
        return BaseLabel(frames, self.source) if frames.any() else None


def painted_prompts(
    fg: np.ndarray, bg: np.ndarray, label: str, value: int, allowed: tuple[int, int] | None = None
) -> list[KeySlicePrompt]:
    """Scribbles painted into a label volume (frames of bool, fg and bg) as one prompt per painted slice."""
    painted = np.flatnonzero((fg | bg).reshape(len(fg), -1).any(axis=1))
    if allowed is not None:
        painted = painted[(painted >= allowed[0]) & (painted <= allowed[1])]
    if len(painted) > MAX_PAINTED_KEY_SLICES:
        raise PromptError(
            f"Scribbles were painted on {len(painted)} slices; at most {MAX_PAINTED_KEY_SLICES} are accepted. "
            "Paint on a few key slices of the axis the request names (axial by default)."
        )
    return [
        KeySlicePrompt(label, value, int(k), strokes=Strokes(painted_foreground=fg[k], painted_background=bg[k]))
        for k in painted
    ]


def refine_range(
    keys: list[int], requested: tuple[int, int] | None, base: BaseLabel | None, value: int, n: int
) -> tuple[int, int]:
    """The slices a request may change for one label (see the module docstring)."""
    if requested is not None:
        lo, hi = requested
        return min(lo, *keys), max(hi, *keys)
    if base is not None and base.holds(value):
        return min(keys), max(keys)
    return 0, n - 1


def boundary_prompts(base: BaseLabel, label: str, value: int, span: tuple[int, int]) -> list[KeySlicePrompt]:
    """The base's masks on the slices just outside ``span``, where it holds the label, as mask prompts."""
    prompts = []
    for index in (span[0] - 1, span[1] + 1):
        if 0 <= index < len(base.frames):
            mask = base.slice_mask(value, index)
            if mask.any():
                prompts.append(KeySlicePrompt(label, value, index, mask=mask))
    return prompts


def compose_with_base(base: BaseLabel, computed: np.ndarray, spans: dict[int, tuple[int, int]]) -> np.ndarray:
    """The answer: ``computed`` frames (label values) inside each recomputed label's span, the base elsewhere."""
    out = base.frames.copy()
    for value, (lo, hi) in spans.items():
        part = out[lo : hi + 1]
        part[part == value] = 0
        part[computed[lo : hi + 1] == value] = value
    return out


def _label_info_values(label_info: object) -> dict[str, int]:
    """Slicer's ``label_info`` ([{"name", "id"}]; MONAI Label's save form uses "idx") as name -> value."""
    if not isinstance(label_info, list):
        raise PromptError("label_info must be a list of {name, id} objects naming the uploaded label's values.")
    values = {}
    for n, entry in enumerate(label_info):
        value = entry.get("id", entry.get("idx")) if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(value, int):
            raise PromptError(f"label_info[{n}] must be {{name: text, id: whole number}}, got {entry!r}.")
        values[entry["name"]] = value
    return values


def decode_label(frames: np.ndarray, label_file: LabelFile, labels: LabelMap, target: tuple[str, int]) -> DecodedLabel:
    """Split a label volume (values as in the file) into the base label (app values) and painted scribbles.

    With ``label_info``, segments named ``foreground_scribbles``/``background_scribbles`` are scribbles and
    segments named like the model's labels are the base; others are ignored. Without it, the scribbles convention
    reads 1 as ``target`` and 2/3 as background/foreground scribbles, and otherwise values are the model's labels.
    """
    if label_file.label_info not in (None, "", []):
        named = _label_info_values(label_file.label_info)
    elif label_file.scribbles_convention:
        named = {target[0]: DEFAULT_SCRIBBLE_VALUES["label"]}
        named.update({k: v for k, v in DEFAULT_SCRIBBLE_VALUES.items() if k != "label"})
    else:
        present = {int(v) for v in np.unique(frames)} - {0}
        unknown = sorted(present - set(labels.by_value))
        if unknown:
            known = ", ".join(f"{k} ({v})" for k, v in labels.by_name.items())
            raise PromptError(
                f"The {label_file.source} label holds the values {unknown[:10]}, which are not labels of this model "
                f"({known}). Send label_info naming each value, or a label map in these values."
            )
        named = {labels.by_value[v]: v for v in present}
    base = np.zeros(frames.shape, dtype=np.uint8)
    for name, value in named.items():
        if name in (FOREGROUND_SCRIBBLES, BACKGROUND_SCRIBBLES):
            continue
        try:
            _, app_value = labels.resolve(name)
        except PromptError:
            continue  # e.g. Slicer's "background" segment
        base[frames == value] = app_value
    fg = frames == named[FOREGROUND_SCRIBBLES] if FOREGROUND_SCRIBBLES in named else None
    bg = frames == named[BACKGROUND_SCRIBBLES] if BACKGROUND_SCRIBBLES in named else None
    return DecodedLabel(BaseLabel(base, label_file.source) if base.any() else None, label_file.source, fg, bg)


def painted_axis(values_kji: np.ndarray, label_file: LabelFile, labels: LabelMap, target: tuple[str, int]) -> int:
    """The IJK axis scribbles were painted across (the one on which they touch the fewest slices; axial on a tie):
    a viewer paints in a slice view that need not be the volume's k axis."""
    decoded = decode_label(values_kji, label_file, labels, target)
    painted = np.zeros(values_kji.shape, dtype=bool)
    for mask in (decoded.foreground, decoded.background):
        if mask is not None:
            painted |= mask
    if not painted.any():
        return 2
    counts = {2: painted.any(axis=(1, 2)).sum(), 1: painted.any(axis=(0, 2)).sum(), 0: painted.any(axis=(0, 1)).sum()}
    return min(counts, key=lambda axis: (counts[axis], axis != 2))
