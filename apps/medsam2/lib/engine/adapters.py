"""Low-rank adapters (LoRA, with ``peft``) on SAM2's attention projections: the Hiera blocks' ``attn.qkv`` and
``attn.proj`` and the memory attention's ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (self-attention and
cross-attention to the memories).

A ``lora`` training run adds them (:func:`add_lora_adapters`), trains only them, and publishes a small file
(:func:`save_adapter`): the adapter weights, their configuration and the identity of the base weights they were
trained on (its name and a fingerprint of its tensors). Serving loads one strictly on top of the same base weights
(:func:`load_adapter`) and merges it into them (:func:`merge_adapter`): plain modules again, no cost per request.

No MONAI Label imports. ``peft`` (which imports ``transformers``, a few seconds) is imported only when an adapter is
used.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from lib.atomic_files import atomic_write
from lib.engine.checkpoints import CheckpointError

# the modules that get adapters (a full match of the module's name, as peft reads a string target_modules)
TARGET_MODULES = (
    r"(image_encoder\.trunk\.blocks\.\d+\.attn\.(qkv|proj)"
    r"|memory_attention\.layers\.\d+\.(self_attn|cross_attn_image)\.(q_proj|k_proj|v_proj|out_proj))"
)
ADAPTER_FORMAT = "medsam2-lora"
ADAPTER_VERSION = 1
ADAPTERS_FOLDER = "adapters"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LORA_KEY = re.compile(r"\.lora_[A-Za-z_]+\.")


def adapter_path(published: Path, name: str) -> Path:
    """Where adapter ``name`` lives: ``adapters/<name>.pt`` in the folder of the published checkpoint."""
    if not ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"an adapter name is 1 to 64 letters, digits, '-' or '_', got {name!r}")
    return published.parent / ADAPTERS_FOLDER / f"{name}.pt"


def _lora_config(rank: int, alpha: float, target_modules: str = TARGET_MODULES) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, bias="none")


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds (unmerged) LoRA layers."""
    return any(_is_lora_layer(m) for m in model.modules())


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def add_lora_adapters(model: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    """Add adapters of ``rank`` (scale ``alpha / rank``) to the target projections, in place; only they then
    require grad. Their B matrices start at zero, so the model computes exactly what it did before."""
    from peft import inject_adapter_in_model

    if has_adapters(model):
        raise ValueError("the model already has adapters: merge them first (merge_adapter)")
    return inject_adapter_in_model(_lora_config(rank, alpha), model)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model`` (peft's key names, without the adapter's name), on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def base_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the base weights (every tensor of the state dict but the adapters', under its plain name):
    the same whether or not adapters are injected, different after any change of a base weight."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if is_adapter_weight(name):
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name.replace('.base_layer.', '.')}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adapter(
    model: torch.nn.Module, path: Path, base_name: str, rank: int, alpha: float, extra: dict | None = None
) -> None:
    """Write the adapter of ``model`` atomically (a reader sees the old file or the new one): its weights, its
    configuration, and the base weights' name and fingerprint; ``extra`` (e.g. epoch, val_dice) is kept beside."""
    payload = {
        **(extra or {}),
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "base": {"name": base_name, "fingerprint": base_fingerprint(model)},
        "lora": {"rank": int(rank), "alpha": float(alpha), "target_modules": TARGET_MODULES},
        "adapter": adapter_state(model),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, pause_at="checkpoint_publish_before_replace") as tmp_name:
        torch.save(payload, tmp_name)


def read_adapter(path: Path) -> dict:
    """The payload of an adapter file, its format checked; :class:`CheckpointError` saying what is wrong."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"Adapter file {path} does not exist.") from None
    except Exception as e:  # truncated, not a torch file, or holding objects other than tensors
        raise CheckpointError(f"Adapter {path} cannot be read ({type(e).__name__}: {e}).") from e
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path} is not a MedSAM2 adapter file (written by a train_parts=lora run).")
    if payload.get("version") != ADAPTER_VERSION:
        raise CheckpointError(f"Adapter {path} has format version {payload.get('version')!r}; expected 1.")
    lora, base = payload.get("lora"), payload.get("base")
    if not (isinstance(lora, dict) and isinstance(base, dict) and isinstance(payload.get("adapter"), dict)):
        raise CheckpointError(f"Adapter {path} lacks its configuration, base or weights.")
    return payload


def load_adapter(model: torch.nn.Module, path: Path, base_name: str = "") -> dict:
    """Add the adapter in ``path`` to ``model`` (its base weights, without adapters) strictly: the base weights
    must be those it was trained on and every adapter weight must match; :class:`CheckpointError` otherwise
    (``base_name``: what the model's weights are called, for that message); on an error the model is left as it
    came. Returns the file's payload (``base``, ``lora``, and what the trainer added, e.g. ``epoch``)."""
    payload = read_adapter(path)
    base, lora = payload["base"], payload["lora"]
    fingerprint = base_fingerprint(model)
    if base.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"Adapter {path} was trained on other weights ({base.get('name')!r}) than the ones it would be added "
            f"to{f' ({base_name!r})' if base_name else ''}: train it again on these weights, or serve the weights "
            "it was trained on."
        )
    try:
        try:
            add_lora_adapters_like(model, lora)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"Adapter {path} has an unusable configuration {lora!r} ({e}).") from e
        _set_adapter_weights(model, payload["adapter"], path)
    except CheckpointError:
        remove_adapters(model)  # the model as it came
        raise
    return payload


def _set_adapter_weights(model: torch.nn.Module, weights: dict, path: Path) -> None:
    from peft import set_peft_model_state_dict

    expected, found = set(adapter_state(model)), set(weights)
    if found != expected:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(
            f"Adapter {path} does not fit the model: {len(missing)} missing weights (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})."
        )
    try:
        set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CheckpointError(f"Adapter {path} does not fit the model: {str(e).splitlines()[-1].strip()}") from e


def add_lora_adapters_like(model: torch.nn.Module, lora: dict) -> torch.nn.Module:
    """Add adapters configured as an adapter file's ``lora`` entry says (rank, alpha, target modules)."""
    from peft import inject_adapter_in_model

    rank, alpha, targets = int(lora["rank"]), float(lora["alpha"]), str(lora["target_modules"])
    if rank < 1 or not alpha > 0:
        raise ValueError("rank must be >= 1 and alpha > 0")
    return inject_adapter_in_model(_lora_config(rank, alpha, targets), model)


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every adapter into its base weight (W + alpha/rank * B @ A) and put the plain module back, in place:
    the model then has SAM2's own modules and state-dict names, and costs nothing extra per request."""
    return _unload(model, merge=True)


def remove_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Drop every adapter unmerged and put the plain modules back, in place: the base model as it was."""
    return _unload(model, merge=False)


def _unload(model: torch.nn.Module, merge: bool) -> torch.nn.Module:
    for name, module in list(model.named_modules()):
        if not _is_lora_layer(module):
            continue
        if merge:
            module.merge(safe_merge=True)  # refuses non-finite merged weights
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def is_adapter_weight(name: str) -> bool:
    """Whether the parameter (or state-dict entry) ``name`` is an adapter weight."""
    return _LORA_KEY.search(name) is not None


def adapter_parameter_count(model: torch.nn.Module) -> int:
    """Number of adapter weights in ``model``."""
    return sum(p.numel() for name, p in model.named_parameters() if is_adapter_weight(name))
