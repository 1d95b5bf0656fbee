"""LoRA adapters (lib/engine/adapters.py, train_parts="lora"): where they go, that a lora run trains only them,
their small file and its strict loading, merging for serving, and the model provider serving base + adapter."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_image
from lib.engine.adapters import (
    TARGET_MODULES,
    adapter_parameter_count,
    adapter_path,
    add_lora_adapters,
    has_adapters,
    is_adapter_weight,
    load_adapter,
    merge_adapter,
    read_adapter,
    save_adapter,
)
from lib.engine.checkpoints import CheckpointError, build_model, resolve_checkpoint, save_checkpoint
from lib.engine.model_provider import ModelProvider
from lib.engine.preprocessing import parse_window
from lib.settings import SettingError, parse_settings
from lib.training.data import Study
from lib.training.loop import EpochReport, TrainResult, configure_trainable, train
from lib.training.settings import TrainSettings
from sam2_testing import small_config_file

LORA = TrainSettings(
    epochs=1, steps_per_epoch=2, clip_length=3, max_objects=1, lr=1e-2, grad_clip=1.0, p_box=1.0, train_parts="lora"
)
ADAPTED = re.compile(
    r"image_encoder\.trunk\.blocks\.\d+\.attn\.(qkv|proj)"
    r"|memory_attention\.layers\.\d+\.(self_attn|cross_attn_image)\.(q|k|v|out)_proj"
)


def tiny_study(seed: int) -> Study:
    """8 slices of 32 x 32: a bright block (label 1) in noise."""
    rng = np.random.default_rng(seed)
    frames = rng.normal(60, 20, (8, 32, 32))
    label = np.zeros(frames.shape, np.uint8)
    label[2:6, 10:22, 8:20] = 1
    frames[label == 1] += 120
    return Study(f"t{seed}", np.clip(frames, 0, 255).astype(np.uint8), label, (2.0, 1.0, 1.0))


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under their plain names (as a model without adapters names them), copied."""
    return {
        k.replace(".base_layer.", "."): v.detach().clone()
        for k, v in model.state_dict().items()
        if not is_adapter_weight(k)
    }


@torch.no_grad()
def outputs(model: torch.nn.Module) -> torch.Tensor:
    """The image encoder's features and the memory attention's output on fixed inputs (every adapted layer)."""
    gen = torch.Generator().manual_seed(0)
    size = model.image_size
    features = model.image_encoder(torch.randn(1, 3, size, size, generator=gen))["vision_features"]
    hw, dim, mem_dim = (size // 16) ** 2, model.memory_attention.d_model, model.mem_dim
    curr, curr_pos = torch.randn(hw, 1, dim, generator=gen), torch.randn(hw, 1, dim, generator=gen)
    memory, memory_pos = torch.randn(2 * hw, 1, mem_dim, generator=gen), torch.randn(2 * hw, 1, mem_dim, generator=gen)
    attended = model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos)
    return torch.cat([features.flatten(), attended.flatten()])


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return small_config_file(tmp_path_factory.mktemp("config"), 128)


def fresh(config: Path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config).eval()


@pytest.fixture(scope="module")
def trained(config, tmp_path_factory):
    """A base model saved as a checkpoint, and a copy of it after a short lora run (with its base weights and
    outputs from before the run)."""
    folder = tmp_path_factory.mktemp("trained")
    base = fresh(config)
    checkpoint = folder / "base.pt"
    save_checkpoint(base, checkpoint)
    model = copy.deepcopy(base)
    before = base_state(model)
    studies, val = [tiny_study(1), tiny_study(2)], [tiny_study(3)]
    result = train(model, studies, val, LORA, torch.device("cpu"), None, lambda m, r: None)
    return {"model": model.eval(), "base": base, "before": before, "checkpoint": checkpoint, "result": result}


def test_adapters_go_on_the_attention_projections_only(config):
    model = add_lora_adapters(fresh(config), 4, 8.0)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    expected = {n for n, m in fresh(config).named_modules() if isinstance(m, torch.nn.Linear) and ADAPTED.fullmatch(n)}
    assert adapted == expected and len(adapted) == 12 * 2 + 4 * 8  # hiera-t: 12 blocks; 4 memory attention layers
    assert not any(n.startswith(("sam_mask_decoder", "sam_prompt_encoder", "memory_encoder")) for n in adapted)
    assert all(re.fullmatch(TARGET_MODULES, n) for n in adapted)
    # B starts at zero: the model computes what it did before
    assert torch.equal(outputs(model), outputs(fresh(config)))


def test_a_lora_run_trains_only_the_adapters(config):
    model = fresh(config)
    groups = configure_trainable(model, "lora", TrainSettings(train_parts="lora", lora_rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_weight(n) for n in trainable)
    assert [g["name"] for g in groups] == ["adapters"]
    assert sum(p.numel() for p in groups[0]["params"]) == adapter_parameter_count(model)
    assert model.image_encoder.trunk.blocks[0].attn.qkv.lora_A["default"].weight.shape[0] == 4
    configure_trainable(model, "lora")  # again: the adapters there are kept, not added twice
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter_parameter_count(model)


def test_training_changes_the_output_and_leaves_every_base_weight_as_it_was(trained):
    model = trained["model"]
    assert has_adapters(model) and trained["result"].epochs
    after = base_state(model)
    assert after.keys() == trained["before"].keys()
    assert all(torch.equal(after[k], trained["before"][k]) for k in after)
    assert not torch.equal(outputs(model), outputs(trained["base"]))


def test_the_adapter_file_is_small_and_loads_into_a_fresh_base_with_identical_outputs(trained, config, tmp_path):
    path = adapter_path(tmp_path / "published.pt", "site")
    assert path == tmp_path / "adapters" / "site.pt"
    save_adapter(trained["model"], path, "base", LORA.lora_rank, LORA.lora_alpha, {"epoch": 1})
    full = trained["checkpoint"].stat().st_size
    assert path.stat().st_size < 0.05 * full, (path.stat().st_size, full)
    payload = read_adapter(path)
    assert payload["base"]["name"] == "base" and payload["lora"]["rank"] == 8 and payload["epoch"] == 1
    assert all(is_adapter_weight(k) for k in payload["adapter"])
    model = fresh(config)
    load_adapter(model, path)
    assert torch.equal(outputs(model), outputs(trained["model"]))


def test_a_merged_adapter_computes_the_same_with_plain_modules(trained, config):
    unmerged = outputs(trained["model"])
    merged = merge_adapter(copy.deepcopy(trained["model"]))
    assert not has_adapters(merged) and not hasattr(merged, "peft_config")
    assert type(merged.image_encoder.trunk.blocks[0].attn.qkv) is torch.nn.Linear
    assert torch.allclose(outputs(merged), unmerged, rtol=1e-4, atol=1e-5)
    # SAM2's own state-dict names: it loads strictly into a model built from the config
    fresh(config).load_state_dict(merged.state_dict(), strict=True)


def test_wrong_or_corrupt_adapter_files_are_refused_clearly(trained, config, tmp_path):
    good = tmp_path / "good.pt"
    save_adapter(trained["model"], good, "base", LORA.lora_rank, LORA.lora_alpha)

    def refused(path: Path, model: torch.nn.Module | None = None) -> str:
        model = model or fresh(config)
        with pytest.raises(CheckpointError) as error:
            load_adapter(model, path, "served")
        assert not has_adapters(model)  # left as it came
        return str(error.value)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    assert "cannot be read" in refused(truncated)
    assert "is not a MedSAM2 adapter file" in refused(trained["checkpoint"])  # a full checkpoint
    assert "does not exist" in refused(tmp_path / "absent.pt")
    message = refused(good, fresh(config, seed=1))  # other base weights
    assert "trained on other weights ('base')" in message and "'served'" in message
    payload = torch.load(good, weights_only=True)
    payload["adapter"].pop(next(iter(payload["adapter"])))
    torch.save(payload, tmp_path / "missing.pt")
    assert "1 missing weights" in refused(tmp_path / "missing.pt")
    payload = torch.load(good, weights_only=True)
    key = next(iter(payload["adapter"]))
    payload["adapter"][key] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "shape.pt")
    assert "does not fit the model" in refused(tmp_path / "shape.pt")


def test_the_provider_serves_base_plus_adapter_and_reloads_when_it_is_replaced(trained, config, tmp_path):
    checkpoint = resolve_checkpoint(str(trained["checkpoint"]), config=config)
    adapter = adapter_path(tmp_path / "published.pt", "site")
    # SAM2's own modules (not the CPU forms, equal only up to rounding): the outputs below compare exactly
    provider = ModelProvider(
        checkpoint, torch.device("cpu"), None, tmp_path / "published.pt", adapter, cpu_tracking="stock"
    )
    model, version = provider.get()
    assert torch.equal(outputs(model), outputs(trained["base"]))  # no adapter file yet: the base weights
    assert provider.adapter_info() == {"name": "site", "file_bytes": None, "loaded": None}

    save_adapter(trained["model"], adapter, checkpoint.name, LORA.lora_rank, LORA.lora_alpha, {"epoch": 1})
    model, version2 = provider.get()
    assert version2 == version + 1 and not has_adapters(model)  # merged
    assert torch.allclose(outputs(model), outputs(trained["model"]), rtol=1e-4, atol=1e-5)
    info = provider.adapter_info()
    assert info["file_bytes"] == adapter.stat().st_size and info["loaded"]["name"] == "site"
    assert info["loaded"]["bytes"] == adapter.stat().st_size and info["loaded"]["epoch"] == 1
    assert provider.get() == (model, version2)  # unchanged file: no reload

    stronger = copy.deepcopy(trained["model"])
    with torch.no_grad():
        for name, p in stronger.named_parameters():
            if "lora_B" in name:
                p.mul_(3)
    save_adapter(stronger, adapter, checkpoint.name, LORA.lora_rank, LORA.lora_alpha, {"epoch": 2})
    model3, version3 = provider.get()
    assert version3 == version2 + 1 and provider.adapter_info()["loaded"]["epoch"] == 2
    assert torch.allclose(outputs(model3), outputs(stronger), rtol=1e-4, atol=1e-5)

    adapter.write_bytes(b"not an adapter")  # a broken replacement: the served model stays
    assert provider.get() == (model3, version3)


def test_settings_name_the_served_adapter_and_the_one_a_lora_run_writes():
    s = parse_settings({"adapter": "liver_2"}, cuda_available=False)
    assert (s.adapter, s.train.adapter_name) == ("liver_2", "liver_2")  # a lora run updates the served one
    s = parse_settings({"adapter": "liver", "adapter_name": "kidney"}, cuda_available=False)
    assert (s.adapter, s.train.adapter_name) == ("liver", "kidney")
    s = parse_settings({}, cuda_available=False)
    assert (s.adapter, s.train.adapter_name, s.train.lora_rank, s.train.lora_alpha) == ("", "site", 8, 16.0)
    for bad in ("../x", "a b", "x" * 65, "site.pt"):
        with pytest.raises(SettingError, match="--conf adapter"):
            parse_settings({"adapter": bad}, cuda_available=False)
        with pytest.raises(ValueError, match="adapter_name"):
            TrainSettings(adapter_name=bad)
    with pytest.raises(ValueError, match="lora_rank"):
        TrainSettings(lora_rank=0)
    with pytest.raises(ValueError):
        adapter_path(Path("/tmp/published.pt"), "../../etc")


def test_a_lora_run_publishes_only_its_adapter_beside_the_published_weights(trained, config, tmp_path, monkeypatch):
    from lib.trainers import medsam2 as trainer

    def fake_train(model, train_studies, val_studies, settings, device, dtype, publish, *args, **kwargs):
        configure_trainable(model, settings.train_parts, settings)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        publish(model, EpochReport(1, 0.5, 0.6, 0.5, {}, 1.0, 1.0, True))
        return TrainResult(initial={"dice": 0.1}, best_dice=0.6, best_epoch=1, published=True)

    monkeypatch.setattr(trainer, "train", fake_train)
    study = tiny_study(1)
    geometry = dict(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(study.frames.astype(np.int16), tmp_path / "image.nii.gz", **geometry)
    write_image(study.label, tmp_path / "label.nii.gz", **geometry)
    item = ("image.nii.gz", str(tmp_path / "image.nii.gz"), str(tmp_path / "label.nii.gz"))
    checkpoint = resolve_checkpoint(str(trained["checkpoint"]), config=config)
    published = tmp_path / "model" / "published.pt"
    job = trainer._Job(
        settings=TrainSettings(train_parts="lora", lora_rank=4, adapter_name="liver"),
        checkpoint=checkpoint,
        published=published,
        stats_path=tmp_path / "stats.json",
        window=parse_window("128,256"),
        train_items=[item],
        val_items=[item],
        provider_device_type="cpu",
        provider_dtype=None,
        state={"status": "RUNNING", "started": time.time()},
        **({"reference_items": []} if "reference_items" in {f.name for f in dataclasses.fields(trainer._Job)} else {}),
    )
    trainer._run(job, torch.device("cpu"), None)
    adapter = published.parent / "adapters" / "liver.pt"
    assert adapter.exists() and not published.exists()  # the full weights are not written
    assert json.loads((tmp_path / "stats.json").read_text())["published_to"] == str(adapter)
    payload = read_adapter(adapter)
    assert (payload["base"]["name"], payload["lora"]["rank"], payload["epoch"]) == (checkpoint.name, 4, 1)
    provider = ModelProvider(checkpoint, torch.device("cpu"), None, published, adapter)
    model, _ = provider.get()
    assert provider.adapter_info()["loaded"]["name"] == "liver"
    assert not torch.equal(outputs(model), outputs(trained["base"]))
