"""Drawn prompts on a slice: scribbles (open strokes) and lassos (closed outlines), as masks or sampled clicks.

Coordinates are pixels of a slice: x is the column, y the row (as for boxes and clicks). A lasso is filled into a
mask that SAM2 takes as its mask prompt; a scribble becomes either clicks sampled along the stroke or a mask
that guides SAM2's decoder (``SCRIBBLE_MODES``; ``bench/scribble_prompts.py`` compares them, docs/prompts.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from scipy import ndimage
from skimage.draw import line as draw_line
from skimage.draw import polygon as fill_polygon

from lib.errors import PromptError

SCRIBBLE_MODES = ("points", "mask")
MAX_STROKE_POINTS = 1000
SCRIBBLE_CLICKS = 6  # clicks sampled from one slice's strokes of one kind (foreground or background)
SCRIBBLE_WIDTH = 3  # pixels a scribble covers across, as a mask


@dataclass(frozen=True, eq=False)
class Strokes:
    """One slice's drawn prompts of one label, each a list of (x, y) vertex arrays."""

    foreground_scribbles: tuple[np.ndarray, ...] = ()
    background_scribbles: tuple[np.ndarray, ...] = ()
    foreground_lasso: tuple[np.ndarray, ...] = ()
    background_lasso: tuple[np.ndarray, ...] = ()
    # scribbles painted into an uploaded label volume (Slicer's scribbles segments): bool (rows, cols) or None
    painted_foreground: np.ndarray | None = None
    painted_background: np.ndarray | None = None

    def has_scribbles(self) -> bool:
        painted = [m for m in (self.painted_foreground, self.painted_background) if m is not None]
        return bool(self.foreground_scribbles or self.background_scribbles or any(m.any() for m in painted))

    def is_empty(self) -> bool:
        return not (self.has_scribbles() or self.foreground_lasso or self.background_lasso)

    def scribble_masks(self, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """(foreground, background) scribbles as bool masks: strokes one pixel wide plus painted pixels."""
        fg = stroke_mask(self.foreground_scribbles, rows, cols)
        bg = stroke_mask(self.background_scribbles, rows, cols)
        if self.painted_foreground is not None:
            fg |= self.painted_foreground
        if self.painted_background is not None:
            bg |= self.painted_background
        return fg, bg


def stroke_mask(strokes: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
    """Open polylines rasterised one pixel wide (a single vertex is one pixel)."""
    mask = np.zeros((rows, cols), dtype=bool)
    for stroke in strokes:
        xy = np.rint(stroke).astype(int)
        if len(xy) == 1:
            mask[xy[0, 1], xy[0, 0]] = True
        for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:], strict=True):
            rr, cc = draw_line(y0, x0, y1, x1)
            mask[rr, cc] = True
    return mask


def lasso_mask(outlines: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
    """Closed outlines filled (their boundary included)."""
    mask = np.zeros((rows, cols), dtype=bool)
    for outline in outlines:
        rr, cc = fill_polygon(outline[:, 1], outline[:, 0], shape=(rows, cols))
        mask[rr, cc] = True
        closed = np.vstack([outline, outline[:1]])
        mask |= stroke_mask((closed,), rows, cols)
    return mask


def widen(mask: np.ndarray, width: int = SCRIBBLE_WIDTH) -> np.ndarray:
    """A one-pixel stroke drawn ``width`` pixels wide."""
    if width <= 1 or not mask.any():
        return mask
    return ndimage.binary_dilation(mask, iterations=width // 2)


def sample_clicks(mask: np.ndarray, count: int = SCRIBBLE_CLICKS) -> list[tuple[float, float]]:
    """Up to ``count`` (x, y) pixels of ``mask`` spread along it: farthest-point sampling, starting from the
    pixel nearest the mask's centroid (deterministic)."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return []
    pts = np.stack([cols, rows], axis=1).astype(np.float64)
    first = int(np.argmin(((pts - pts.mean(axis=0)) ** 2).sum(axis=1)))
    chosen = [first]
    dist = ((pts - pts[first]) ** 2).sum(axis=1)
    while len(chosen) < min(count, len(pts)):
        nxt = int(np.argmax(dist))
        if dist[nxt] == 0:
            break
        chosen.append(nxt)
        dist = np.minimum(dist, ((pts - pts[nxt]) ** 2).sum(axis=1))
    return [(float(pts[i, 0]), float(pts[i, 1])) for i in chosen]


def _segments_cross(a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """Whether segments a (n) and b (m) properly cross, as an (n, m) bool matrix (touching ends do not count)."""

    def orient(p, q, r):
        return np.sign(
            (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        )

    A0, A1 = a0[:, None], a1[:, None]
    B0, B1 = b0[None], b1[None]
    d1, d2 = orient(A0, A1, B0), orient(A0, A1, B1)
    d3, d4 = orient(B0, B1, A0), orient(B0, B1, A1)
    return (d1 * d2 < 0) & (d3 * d4 < 0)


def check_lasso(outline: np.ndarray, what: str) -> None:
    """Refuse an outline that cannot be filled unambiguously: under 3 vertices, no area, or crossing itself."""
    if len(outline) < 3:
        raise PromptError(f"{what} has {len(outline)} point(s): a lasso outline needs at least 3 points.")
    closed = np.vstack([outline, outline[:1]])
    starts, ends = closed[:-1], closed[1:]
    crossing = _segments_cross(starts, ends, starts, ends)
    n = len(starts)
    crossing[np.arange(n)[:, None] >= np.arange(n)[None, :] - 1] = False  # each pair once; neighbours share a vertex
    crossing[0, n - 1] = False
    if crossing.any():
        i, j = (int(v) for v in np.argwhere(crossing)[0])
        raise PromptError(
            f"{what} crosses itself (its edges {i} and {j} intersect), so its inside is ambiguous. "
            "Draw the outline without crossing it, or send two lassos."
        )
    x, y = outline[:, 0], outline[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    if area < 1.0:
        raise PromptError(f"{what} encloses no area ({area:.2f} pixels): draw the outline around the region.")


def parse_strokes(value: object, rows: int, cols: int, what: str, closed: bool) -> tuple[np.ndarray, ...]:
    """A JSON list of strokes, each a list of [x, y] pixels inside the slice, into arrays (lassos checked)."""
    if value is None or value == "" or value == []:
        return ()
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"{what} must be a list of strokes, each a list of [x, y] points.")
    if len(value) > 64:
        raise PromptError(f"{what} has {len(value)} strokes; at most 64 are accepted.")
    strokes = []
    for n, stroke in enumerate(value):
        name = f"{what}[{n}]"
        if not isinstance(stroke, (list, tuple)) or not stroke:
            raise PromptError(f"{name} must be a non-empty list of [x, y] points.")
        if len(stroke) > MAX_STROKE_POINTS:
            raise PromptError(f"{name} has {len(stroke)} points; at most {MAX_STROKE_POINTS} are accepted.")
        try:
            xy = np.asarray(stroke, dtype=np.float64)
        except (TypeError, ValueError):
            raise PromptError(f"{name} must be a list of [x, y] number pairs.") from None
        if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
            raise PromptError(f"{name} must be a list of [x, y] number pairs with finite values.")
        outside = (xy[:, 0] < 0) | (xy[:, 0] > cols - 1) | (xy[:, 1] < 0) | (xy[:, 1] > rows - 1)
        if outside.any():
            x, y = xy[int(np.argmax(outside))]
            raise PromptError(
                f"{name} has the point ({x:g}, {y:g}) outside the image slice "
                f"(columns 0..{cols - 1}, rows 0..{rows - 1})."
            )
        if closed:
            check_lasso(xy, name)
        strokes.append(xy)
    return tuple(strokes)


def scribble_clicks(strokes: Strokes, rows: int, cols: int) -> list[tuple[float, float, int]]:
    """Points mode: clicks sampled along the foreground (label 1) and background (label 0) scribbles."""
    fg, bg = strokes.scribble_masks(rows, cols)
    return [(x, y, 1) for x, y in sample_clicks(fg)] + [(x, y, 0) for x, y in sample_clicks(bg)]


def scribble_prior(strokes: Strokes, base: np.ndarray | None, rows: int, cols: int) -> np.ndarray | None:
    """Mask mode: ``base`` (the slice's existing mask, if any) plus the foreground scribbles, widened, minus the
    background ones (None without scribbles)."""
    if not strokes.has_scribbles():
        return None
    fg, bg = strokes.scribble_masks(rows, cols)
    return ((base if base is not None else False) | widen(fg)) & ~widen(bg)


def lasso_edits(strokes: Strokes, rows: int, cols: int) -> np.ndarray | None:
    """int8 (rows, cols): +1 where a foreground lasso adds, -1 where a background lasso removes (it wins)."""
    if not (strokes.foreground_lasso or strokes.background_lasso):
        return None
    edits = lasso_mask(strokes.foreground_lasso, rows, cols).astype(np.int8)
    edits[lasso_mask(strokes.background_lasso, rows, cols)] = -1
    return edits


class DrawnPrompt(Protocol):
    """What :func:`resolve_drawn` reads of a prompt (a dataclass such as :class:`lib.engine.prompts.KeySlicePrompt`:
    this module sits below the prompt parser, which builds :class:`Strokes`)."""

    label: str
    slice_index: int
    box: tuple[float, float, float, float] | None
    points: tuple[tuple[float, float], ...]
    point_labels: tuple[int, ...]
    strokes: Strokes


Prompt = TypeVar("Prompt", bound=DrawnPrompt)


def apply_edits(mask: np.ndarray, edits: np.ndarray | None) -> np.ndarray:
    """A slice mask with lasso edits applied, pixel exact."""
    if edits is None:
        return mask
    return (mask | (edits > 0)) & ~(edits < 0)


def resolve_drawn(
    prompt: Prompt, base: np.ndarray | None, mode: str, rows: int, cols: int, refining: bool = False
) -> Prompt:
    """The prompt SAM2 is given on a slice: scribbles turned into clicks or a mask (``mode``), the slice's
    existing mask ``base`` (a label being refined) refined by the clicks or kept as the mask prompt, unless a new
    box replaces it; lasso edits kept for last. PromptError if nothing on the slice says where the object is
    (unless ``refining``: background prompts then remove from the label, which may leave the slice empty)."""
    if mode not in SCRIBBLE_MODES:
        raise PromptError(f"scribble_mode must be one of {', '.join(SCRIBBLE_MODES)}, got {mode!r}.")
    strokes = prompt.strokes
    points = list(zip(prompt.points, prompt.point_labels, strict=True))
    mask = None if prompt.box is not None else base  # a new box replaces the slice's existing mask
    scribbled_mask = None
    if mode == "points":
        points += [((x, y), lab) for x, y, lab in scribble_clicks(strokes, rows, cols)]
    else:
        scribbled_mask = scribble_prior(strokes, mask, rows, cols)
        mask = mask if scribbled_mask is None else scribbled_mask
    edits = lasso_edits(strokes, rows, cols)
    decoded = prompt.box is not None or bool(points) or scribbled_mask is not None
    if not refining and prompt.box is None and not any(lab == 1 for _, lab in points):
        adds = edits is not None and bool((edits > 0).any())
        if not adds and not (mask is not None and mask.any()):
            raise PromptError(
                f"Slice {prompt.slice_index} of {prompt.label} has only background prompts: add a box, a foreground "
                "click, scribble or lasso there, or refine an existing label that holds it (refine_from)."
            )
    if not decoded and edits is not None:  # nothing for SAM2 to decode: the edited mask is the mask prompt
        mask = apply_edits(mask if mask is not None else np.zeros((rows, cols), dtype=bool), edits)
        edits = None
    return dataclasses.replace(
        prompt,
        points=tuple(p for p, _ in points),
        point_labels=tuple(lab for _, lab in points),
        mask=mask,
        mask_is_prior=mask is not None and decoded,
        edits=edits,
    )


def merge_strokes(old: Strokes, new: Strokes) -> Strokes:
    """A correction's strokes added to those already on the slice."""

    def either(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
        return b if a is None else a if b is None else a | b

    return Strokes(
        old.foreground_scribbles + new.foreground_scribbles,
        old.background_scribbles + new.background_scribbles,
        old.foreground_lasso + new.foreground_lasso,
        old.background_lasso + new.background_lasso,
        either(old.painted_foreground, new.painted_foreground),
        either(old.painted_background, new.painted_background),
    )
