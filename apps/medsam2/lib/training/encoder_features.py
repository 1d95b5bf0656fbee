"""The image-encoder features of a training step's slices: computed in one batch, and, while the image encoder
is frozen, kept per (study, slice) so that later epochs reuse them instead of re-encoding (the encoder is most
of a frozen-encoder step's arithmetic). Bounded by bytes, least recently used first out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from lib.engine.preprocessing import frames_to_model_input

SliceKey = tuple[str, int]  # (study name, slice index)


def encoder_is_frozen(model: torch.nn.Module) -> bool:
    """No parameter of the image encoder trains: its output for a slice never changes during the run."""
    return not any(p.requires_grad for p in model.image_encoder.parameters())


def _nbytes(level: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in level)


class EncoderFeatureCache:
    """Image-encoder outputs (``backbone_fpn`` levels) per slice, at most ``max_bytes`` in all; the position
    encodings depend only on the feature sizes and are kept once."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._levels: OrderedDict[SliceKey, list[torch.Tensor]] = OrderedDict()
        self._pos: list[torch.Tensor] | None = None
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: SliceKey) -> list[torch.Tensor] | None:
        levels = self._levels.get(key)
        if levels is not None:
            self._levels.move_to_end(key)
        return levels

    def put(self, key: SliceKey, levels: list[torch.Tensor]) -> None:
        size = _nbytes(levels)
        if size > self.max_bytes or key in self._levels:
            return
        while self.bytes + size > self.max_bytes and self._levels:
            _, old = self._levels.popitem(last=False)
            self.bytes -= _nbytes(old)
        self._levels[key] = levels
        self.bytes += size

    def keep_position_encodings(self, pos: list[torch.Tensor]) -> None:
        if self._pos is None:
            self._pos = [p[:1] for p in pos]

    def position_encodings(self, n: int) -> list[torch.Tensor]:
        assert self._pos is not None
        return [p.expand(n, -1, -1, -1) for p in self._pos]


def _encode(model: torch.nn.Module, frames: Sequence[np.ndarray], device: torch.device) -> dict:
    """The image encoder on (H, W) uint8 slices, which may differ in size (each is resized to the model's input)."""
    size = model.image_size
    if len({f.shape for f in frames}) == 1:
        images = frames_to_model_input(np.stack(frames), size, device)
    else:
        images = torch.cat([frames_to_model_input(f[None], size, device) for f in frames])
    return model.image_encoder(images)


def _with_high_res_projections(model: torch.nn.Module, backbone: dict) -> dict:
    """What ``SAM2Base.forward_image`` adds to the encoder's output: the mask decoder's projections of the two
    high-resolution levels (trainable parameters of the mask decoder, so never cached)."""
    if model.use_high_res_features_in_sam:
        fpn = list(backbone["backbone_fpn"])
        fpn[0] = model.sam_mask_decoder.conv_s0(fpn[0])
        fpn[1] = model.sam_mask_decoder.conv_s1(fpn[1])
        backbone = {**backbone, "backbone_fpn": fpn}
    return backbone


def encode_slices(
    model: torch.nn.Module,
    keys: Sequence[SliceKey],
    frames: Sequence[np.ndarray],
    device: torch.device,
    autocast,
    cache: EncoderFeatureCache | None,
) -> dict:
    """``model.forward_image`` of ``frames`` ((H, W) uint8, the slices named by ``keys``), with the encoder's part
    taken from ``cache`` where it holds the slice (the cache is used only while the encoder is frozen)."""
    if cache is None or not encoder_is_frozen(model):
        with autocast:
            return _with_high_res_projections(model, _encode(model, frames, device))
    per_slice = [cache.get(key) for key in keys]  # taken before new entries can evict them
    missing = [i for i, levels in enumerate(per_slice) if levels is None]
    if missing:
        with torch.no_grad(), autocast:
            fresh = _encode(model, [frames[i] for i in missing], device)
        cache.keep_position_encodings(fresh["vision_pos_enc"])
        for row, i in enumerate(missing):
            per_slice[i] = [level[row : row + 1] for level in fresh["backbone_fpn"]]
            cache.put(keys[i], per_slice[i])
    cache.hits += len(keys) - len(missing)
    cache.misses += len(missing)
    pos = cache.position_encodings(len(keys))
    fpn = [torch.cat([levels[lvl] for levels in per_slice]) for lvl in range(len(per_slice[0]))]  # type: ignore[index]
    with autocast:
        return _with_high_res_projections(
            model, {"vision_features": fpn[-1], "backbone_fpn": fpn, "vision_pos_enc": pos}
        )
