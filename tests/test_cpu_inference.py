"""The CPU forms of SAM2's tracking modules (lib/engine/cpu_inference.py) compute what SAM2's own modules compute."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sam2.modeling.memory_encoder import CXBlock
from sam2.modeling.sam.transformer import RoPEAttention

from lib.engine.checkpoints import load_state_dict_strict, save_checkpoint
from lib.engine.cpu_inference import (
    ContiguousCXBlock,
    ExplicitRoPEAttention,
    use_cpu_inference_modules,
    uses_cpu_inference_modules,
)
from lib.engine.openvino_encoder import use_openvino_image_encoder, uses_openvino_image_encoder
from lib.engine.preprocessing import parse_window, to_uint8
from lib.engine.prompts import KeySlicePrompt
from lib.engine.propagation import propagate_volume
from lib.engine.volume_session import VolumeSession
from sam2_testing import blob_volume, small_model


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.mark.parametrize("kv_in_dim, exclude", [(64, 16), (256, 0)])
def test_explicit_attention_equals_sdpa(kv_in_dim, exclude):
    torch.manual_seed(0)
    module = RoPEAttention(
        256, 1, rope_theta=10000.0, feat_sizes=(8, 8), rope_k_repeat=kv_in_dim != 256, kv_in_dim=kv_in_dim
    ).eval()
    q = torch.randn(2, 64, 256)
    memory = torch.randn(2, 64 * (3 if kv_in_dim != 256 else 1) + exclude, kv_in_dim)
    with torch.no_grad():
        want = module(q, memory, memory, num_k_exclude_rope=exclude)
        module.__class__ = ExplicitRoPEAttention
        got = module(q, memory, memory, num_k_exclude_rope=exclude)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_contiguous_cxblock_equals_sam2s():
    torch.manual_seed(0)
    block = CXBlock(32).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        want = block(x)
        block.__class__ = ContiguousCXBlock
        assert torch.equal(block(x), want)


def test_switch_keeps_the_state_dict_and_training_uses_sam2s_code(tmp_path):
    model = small_model(seed=2)
    save_checkpoint(model, tmp_path / "stock.pt")
    keys = set(model.state_dict())
    assert not uses_cpu_inference_modules(model)
    switched = use_cpu_inference_modules(model)
    assert switched == 2 * len(model.memory_attention.layers) + len(model.memory_encoder.fuser.layers)
    assert uses_cpu_inference_modules(model) and use_cpu_inference_modules(model) == 0  # idempotent
    assert set(model.state_dict()) == keys
    load_state_dict_strict(model, tmp_path / "stock.pt")  # a published checkpoint still loads into it
    layer = model.memory_attention.layers[0].cross_attn_image
    layer.train()
    layer.dropout_p = 0.0  # SAM2's config trains with attention dropout: off here to compare numbers
    q, memory = torch.randn(1, 16, 256), torch.randn(1, 48, 64)
    with torch.no_grad():  # in training mode: SAM2's own forward
        assert torch.allclose(layer(q, memory, memory), RoPEAttention.forward(layer, q, memory, memory), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_masks_match_the_stock_modules_in_fp32(dtype):
    """Dice >= 0.99 against SAM2's modules in fp32, for two labels in both directions (the issue's bound)."""
    frames = to_uint8(blob_volume((12, 64, 64), radius=12.0), parse_window("abdomen"))
    prompts = [
        KeySlicePrompt("a", 1, 6, box=(18.0, 20.0, 46.0, 44.0)),
        KeySlicePrompt("b", 2, 5, points=((32.0, 32.0),), point_labels=(1,)),
    ]
    stock = small_model(seed=3)
    fast = copy.deepcopy(stock)
    use_cpu_inference_modules(fast)
    want = propagate_volume(VolumeSession(frames, stock, "cpu", None), prompts)
    got = propagate_volume(VolumeSession(frames, fast, "cpu", dtype), prompts)
    for name in ("a", "b"):
        a, b = got.binary_mask(name), want.binary_mask(name)
        assert b.sum() > 0
        assert _dice(a, b) >= 0.99, (name, _dice(a, b))
    if dtype is None:  # fp32: the same logits up to rounding
        for name in ("a", "b"):
            for f, logits in want.logits[name].items():
                assert torch.allclose(got.logits[name][f].float(), logits.float(), atol=2e-2)


@pytest.mark.slow
def test_openvino_encoder_matches_sam2s_and_keeps_the_masks():
    """The OpenVINO-compiled encoder: same feature levels (cosine > 0.999 in bf16), any batch size, and masks
    within Dice 0.99 of SAM2's fp32 modules when it serves the engine with the CPU tracking modules."""
    stock = small_model(seed=3)
    fast = copy.deepcopy(stock)
    assert use_openvino_image_encoder(fast) is not None and uses_openvino_image_encoder(fast)
    assert not uses_openvino_image_encoder(stock)
    use_cpu_inference_modules(fast)
    for batch in (1, 3):
        images = torch.rand(batch, 3, 256, 256)
        with torch.inference_mode():
            want, got = stock.forward_image(images), fast.forward_image(images)
        for a, b in zip(want["backbone_fpn"], got["backbone_fpn"], strict=True):
            assert a.shape == b.shape and torch.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
        for a, b in zip(want["vision_pos_enc"], got["vision_pos_enc"], strict=True):
            assert torch.equal(a, b)
    frames = to_uint8(blob_volume((12, 64, 64), radius=12.0), parse_window("abdomen"))
    prompts = [KeySlicePrompt("a", 1, 6, box=(18.0, 20.0, 46.0, 44.0))]
    reference = propagate_volume(VolumeSession(frames, stock, "cpu", None), prompts).binary_mask("a")
    served = propagate_volume(VolumeSession(frames, fast, "cpu", torch.bfloat16), prompts).binary_mask("a")
    assert reference.sum() > 0 and _dice(served, reference) >= 0.99
