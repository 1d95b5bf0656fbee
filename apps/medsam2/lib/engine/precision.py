"""Where the model runs and in which precision: the device, the compute dtype, and the one autocast helper that
every forward pass (inference, the static tracking step, training) enters."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def pick_device(spec: str | None) -> torch.device:
    """``auto`` (default): CUDA when available, else CPU."""
    if not spec or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 matrix products natively (AVX512-BF16 or AMX): about 2x faster than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype_for(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """``auto``: bf16 autocast on CUDA and on CPUs with native bf16; ``fp32``: none; ``bf16``: always."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast_for(
    device: torch.device, dtype: torch.dtype | None, *, cache_enabled: bool = True
) -> AbstractContextManager:
    """bf16/fp16 autocast when asked for (CUDA, or bf16 on a CPU); a no-op otherwise. Entered and exited per
    call, never left on. ``cache_enabled=False`` where a CUDA graph captures the region (its weight casts must
    not be cached outside the graph)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype, cache_enabled=cache_enabled)
    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=dtype, cache_enabled=cache_enabled)
    return nullcontext()
