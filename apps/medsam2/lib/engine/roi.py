"""Region-of-interest tracking: SAM2's tracking step on a window of the cached image-encoder features.

Every slice's features are cached for the whole frame (the image encoder runs once per slice). Tracking one object
does not need all of them: the memory attention costs (query tokens) x (memory tokens), both proportional to the
area tracked, and it is ~80 % of a tracking step. A :class:`Window` cuts the same rectangle out of every feature
level (and out of the positional encodings), so a step attends over ``height * width`` instead of ``grid**2`` tokens
per slice. Nothing is re-encoded. Windows are rectangles where the memory attention knows the window's shape (the
CPU modules of :mod:`lib.engine.cpu_inference`: SAM2's own rotary attention assumes a square grid of tokens), else
squares of the longer side.

What stays exact: the absolute positional encodings (image, memory and the mask decoder's) are cropped from the
full frame's, and the memory attention's rotary encodings are relative, so a token sees the others at the same
offsets as in the full frame. What changes: tokens outside the window are not attended to, and the convolutions of
the memory encoder see zero padding at the window's border. Hence the margin around the object, and
:meth:`Window.touches_border`: a mask that reaches the border makes the caller grow the window or fall back to the
full frame. ``tests/test_roi_tracking.py`` bounds the difference (Dice >= 0.98 against full-frame tracking).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lib.engine import sam2_api
from lib.engine.cpu_inference import rope_grid, uses_cpu_inference_modules

NO_OBJECT_LOGIT = -1024.0  # SAM2's NO_OBJ_SCORE: what a slice's logits are outside the window


@dataclass(frozen=True)
class Window:
    """A rectangle of ``height`` x ``width`` cells at (``top``, ``left``) on the lowest-resolution feature grid
    (``grid`` cells a side; one cell = the backbone stride, 16 pixels of the model's input)."""

    top: int
    left: int
    height: int
    width: int
    grid: int

    @property
    def is_square(self) -> bool:
        return self.height == self.width

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The window of a (..., H, W) map whose side is a multiple of the grid (any feature level, a mask)."""
        scale = x.shape[-1] // self.grid
        t, left = self.top * scale, self.left * scale
        return x[..., t : t + self.height * scale, left : left + self.width * scale]

    def paste(self, crop: torch.Tensor, fill: float = NO_OBJECT_LOGIT) -> torch.Tensor:
        """A (..., height*k, width*k) map (e.g. low-res mask logits) back on the whole frame, ``fill`` elsewhere."""
        scale = crop.shape[-1] // self.width
        full = crop.new_full((*crop.shape[:-2], self.grid * scale, self.grid * scale), fill)
        self.crop(full).copy_(crop)
        return full

    def touches_border(self, crop_logits: torch.Tensor) -> torch.Tensor:
        """(B,) bool: whether a (B, 1, h, w) cropped mask reaches the outermost cell of a side of the window that
        is not the frame's own border (the object may continue outside the window there)."""
        cell = crop_logits.shape[-1] // self.width
        positive = crop_logits[:, 0] > 0
        edges = []
        if self.top > 0:
            edges.append(positive[:, :cell, :])
        if self.top + self.height < self.grid:
            edges.append(positive[:, -cell:, :])
        if self.left > 0:
            edges.append(positive[:, :, :cell])
        if self.left + self.width < self.grid:
            edges.append(positive[:, :, -cell:])
        if not edges:
            return torch.zeros(crop_logits.shape[0], dtype=torch.bool, device=crop_logits.device)
        return torch.stack([e.flatten(1).any(dim=1) for e in edges]).any(dim=0)

    def grown(self, cells: int) -> Window | None:
        """This window with ``cells`` more on every side (kept on the frame); None once it would cover it."""
        center = (self.top + self.height / 2, self.left + self.width / 2)
        return _placed(center, (self.height + 2 * cells, self.width + 2 * cells), self.grid)

    def as_json(self) -> dict[str, int]:
        return {"top": self.top, "left": self.left, "height": self.height, "width": self.width, "grid": self.grid}


def margin_cells(margin: float, grid: int) -> int:
    """A margin given as a fraction of the frame's side, in cells (at least one)."""
    return max(1, math.ceil(margin * grid))


def window_around(masks: Iterable[torch.Tensor], grid: int, margin: int, square: bool = False) -> Window | None:
    """The window around the union of low-res mask logits (each (..., 4*grid, 4*grid), > 0 inside) plus ``margin``
    cells on every side (a square of the longer side when ``square``); None where the masks are all empty or the
    window would cover the frame."""
    union = None
    for m in masks:
        inside = (m > 0).reshape(-1, *m.shape[-2:]).any(dim=0)
        union = inside if union is None else union | inside
    if union is None or not bool(union.any()):
        return None
    scale = union.shape[-1] // grid
    rows = torch.nonzero(union.any(dim=1)).flatten()
    cols = torch.nonzero(union.any(dim=0)).flatten()
    top, bottom = int(rows[0]) // scale, int(rows[-1]) // scale + 1  # cells [top, bottom)
    left, right = int(cols[0]) // scale, int(cols[-1]) // scale + 1
    height, width = bottom - top + 2 * margin, right - left + 2 * margin
    if square:
        height = width = max(height, width)
    return _placed(((top + bottom) / 2, (left + right) / 2), (height, width), grid)


def _placed(center: tuple[float, float], size: tuple[int, int], grid: int) -> Window | None:
    """A window of ``size`` cells (each side at most the frame's) around ``center``, moved inside the frame; None
    where it is the whole frame."""
    height, width = min(size[0], grid), min(size[1], grid)
    if height == grid and width == grid:
        return None
    top = min(max(0, round(center[0] - height / 2)), grid - height)
    left = min(max(0, round(center[1] - width / 2)), grid - width)
    return Window(int(top), int(left), int(height), int(width), grid)


def crop_output(out: dict, window: Window) -> dict:
    """A key slice's compact output (memory, its position encodings, low-res logits) cut to the window."""
    cropped = dict(out)
    if out.get("maskmem_features") is not None:
        cropped["maskmem_features"] = window.crop(out["maskmem_features"]).contiguous()
        cropped["maskmem_pos_enc"] = [window.crop(p).contiguous() for p in out["maskmem_pos_enc"]]
    cropped["pred_masks"] = window.crop(out["pred_masks"]).contiguous()
    return cropped


class _CroppedPromptEncoder(torch.nn.Module):
    """SAM2's prompt encoder whose dense outputs (the no-mask embedding, the image positional encoding) are cut to
    the window. Only for tracked slices: no point or mask prompts there."""

    def __init__(self, inner: torch.nn.Module, window: Window):
        super().__init__()
        self.inner = inner
        self.window = window
        self.mask_input_size = inner.mask_input_size

    def forward(self, points, boxes, masks):
        sparse, dense = self.inner(points=points, boxes=boxes, masks=masks)
        return sparse, self.window.crop(dense)

    def get_dense_pe(self) -> torch.Tensor:
        return self.window.crop(self.inner.get_dense_pe())


class _CroppedMemoryEncoder(torch.nn.Module):
    """SAM2's memory encoder on a window, with the memory's positional encoding cut from the whole frame's (SAM2's
    sine encoding is normalised over the map it is given, so a window's own would not match)."""

    def __init__(self, inner: torch.nn.Module, window: Window):
        super().__init__()
        self.inner = inner
        self.window = window
        self._pos: torch.Tensor | None = None

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False) -> dict:
        out = self.inner(pix_feat, masks, skip_mask_sigmoid=skip_mask_sigmoid)
        x = out["vision_features"]
        if self._pos is None:
            grid = self.window.grid
            full = self.inner.position_encoding(x.new_zeros(1, x.shape[1], grid, grid))
            self._pos = self.window.crop(full).contiguous()
        out["vision_pos_enc"] = [self._pos.to(x.dtype).expand(x.shape[0], -1, -1, -1)]
        return out


def model_view(model: Any, window: Window | None = None, max_key_slices: int = 0) -> Any:
    """The same SAM2 model (same modules and parameters, nothing copied) seen through a window and/or with at most
    ``max_key_slices`` key slices attended per step (SAM2's own ``max_cond_frames_in_attn``; 0: all). Returns
    ``model`` itself when neither applies. SAM2's methods run on the view unchanged."""
    if window is None and max_key_slices <= 0:
        return model
    view = object.__new__(type(model))
    view.__dict__.update(model.__dict__)
    view.__dict__["_modules"] = OrderedDict(model._modules)
    if max_key_slices > 0:
        view.__dict__["max_cond_frames_in_attn"] = int(max_key_slices)
    if window is not None:
        view._modules["sam_prompt_encoder"] = _CroppedPromptEncoder(model.sam_prompt_encoder, window)
        view._modules["memory_encoder"] = _CroppedMemoryEncoder(model.memory_encoder, window)
        if window.is_square:
            view.__dict__["image_size"] = window.height * model.backbone_stride
            view.__dict__["sam_image_embedding_size"] = window.height
        else:
            view._modules["memory_attention"] = _GridMemoryAttention(model.memory_attention, window)
            sam2_api.heads_on_any_grid(view)
    return view


def rectangles_supported(model: Any) -> bool:
    """Whether this model's memory attention takes a rectangular grid of tokens (its CPU modules do)."""
    return uses_cpu_inference_modules(model)


class _GridMemoryAttention(torch.nn.Module):
    """SAM2's memory attention on a rectangular window: its rotary encodings told the window's shape."""

    def __init__(self, inner: torch.nn.Module, window: Window):
        super().__init__()
        self.inner = inner
        self.window = window

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with rope_grid(self.window.height, self.window.width):
            return self.inner(*args, **kwargs)
