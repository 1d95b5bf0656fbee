"""SAM2's tracking modules computed faster on a CPU, with the same parameters and the same results up to rounding.

1. The memory attention: two plain matrix products instead of PyTorch's CPU flash-attention kernel, with the
values kept in the memory's own width.

SAM2 attends from 1024 image tokens (at 512 input) to ~7,200 memory tokens of width 64, projected to 256 with one
head. On a CPU, ``scaled_dot_product_attention`` runs that shape through its flash kernel at about half the speed
of a bf16 matrix product (``bench/cpu_paths.py``). Here the scores are one product and the weighted sum another;
and because the softmax weights of a row sum to one, ``softmax(QK^T) (M W_v^T + b_v) = (softmax(QK^T) M) W_v^T +
b_v``: the weighted sum runs over the 64-wide memory before the value projection instead of the 256-wide
projected values (4x less work for that product). The result is the same up to rounding; the engine's CPU tests
bound the difference and the masks' Dice against the stock module.

2. The memory encoder's ConvNeXt blocks: their pointwise layers get a contiguous input. SAM2 feeds them a permuted
view, which a CPU matrix product handles by copying the weight once per image row (a third of the memory
encoder's time).

Only for inference on a CPU: a GPU keeps SAM2's modules (its flash kernels win there), and training never uses
this (the scores would be kept for the backward pass).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from sam2.modeling.memory_encoder import CXBlock
from sam2.modeling.position_encoding import apply_rotary_enc
from sam2.modeling.sam.transformer import RoPEAttention


class ExplicitRoPEAttention(RoPEAttention):
    """SAM2's ``RoPEAttention`` with explicit score and value products (same parameters, same state dict)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        if self.training or self.num_heads != 1:
            return super().forward(q, k, v, num_k_exclude_rope)
        q = self.q_proj(q)[:, None]  # (B, 1 head, Lq, C)
        k = self.k_proj(k)[:, None]
        freqs_cis = self._freqs_for(q.shape[-2], q.device)
        if q.shape[-2] != k.shape[-2]:
            assert self.rope_k_repeat
        num_k_rope = k.size(-2) - num_k_exclude_rope
        q, k[:, :, :num_k_rope] = apply_rotary_enc(
            q, k[:, :, :num_k_rope], freqs_cis=freqs_cis, repeat_freqs_k=self.rope_k_repeat
        )
        q = q[:, 0] * (1.0 / math.sqrt(q.shape[-1]))
        weights = torch.softmax(torch.bmm(q, k[:, 0].transpose(1, 2)), dim=-1)
        if v.shape[-1] < self.internal_dim:  # the weighted sum in the memory's width, then the value projection
            out = self.v_proj(torch.bmm(weights, v.to(weights.dtype)))
        else:
            out = torch.bmm(weights, self.v_proj(v).to(weights.dtype))
        return self.out_proj(out)

    def _freqs_for(self, tokens: int, device: torch.device) -> torch.Tensor:
        """The rotary frequencies of the grid of ``tokens`` tokens: the one :func:`rope_grid` names in this thread,
        else a square. Cached per shape and never written to the module's shared ``freqs_cis`` (region-of-interest
        tracking runs several shapes, on two threads at once)."""
        shape = getattr(_GRID, "shape", None)
        if shape is None or shape[0] * shape[1] != tokens:
            shape = (math.sqrt(tokens), math.sqrt(tokens))
        cache = self.__dict__.setdefault("_freqs_by_shape", {})
        key = (shape, str(device))
        if key not in cache:
            cache[key] = self.compute_cis(end_x=shape[1], end_y=shape[0]).to(device)
        return cache[key]


_GRID = threading.local()


@contextmanager
def rope_grid(height: int, width: int) -> Iterator[None]:
    """In this thread, the memory attention's tokens are a ``height`` x ``width`` grid (a rectangular window of
    :mod:`lib.engine.roi`), rows first; SAM2's own rotary attention only knows square grids."""
    previous = getattr(_GRID, "shape", None)
    _GRID.shape = (height, width)
    try:
        yield
    finally:
        _GRID.shape = previous


class ContiguousCXBlock(CXBlock):
    """SAM2's ``CXBlock`` with its pointwise layers on a contiguous (N, H, W, C) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1).contiguous()
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


def use_cpu_inference_modules(model: torch.nn.Module) -> int:
    """Switch the memory attention's and the memory encoder's modules to their CPU forms (above) in place; the
    parameters and state dict stay as they are. Returns how many modules were switched."""
    switched = use_explicit_memory_attention(model)
    for module in model.memory_encoder.modules():
        if type(module) is CXBlock:
            module.__class__ = ContiguousCXBlock
            switched += 1
    return switched


def use_explicit_memory_attention(model: torch.nn.Module) -> int:
    """Switch the memory attention's RoPE attention modules (self- and cross-attention) to
    :class:`ExplicitRoPEAttention` in place (parameters and state dict unchanged). Returns how many were switched."""
    switched = 0
    for layer in getattr(model.memory_attention, "layers", []):
        for name in ("self_attn", "cross_attn_image"):
            module = getattr(layer, name, None)
            if type(module) is RoPEAttention:
                module.__class__ = ExplicitRoPEAttention
                switched += 1
    return switched


def uses_cpu_inference_modules(model: torch.nn.Module) -> bool:
    """Whether :func:`use_cpu_inference_modules` was applied to this model."""
    layers = getattr(model.memory_attention, "layers", [])
    return any(isinstance(getattr(layer, "cross_attn_image", None), ExplicitRoPEAttention) for layer in layers)
