"""Checkpoint names, strict loading in the official format, atomic saves, offline failure messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib.engine.checkpoints import (
    KNOWN_CHECKPOINTS,
    MEDSAM2_CONFIG,
    CheckpointError,
    build_model,
    ensure_checkpoint_file,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from sam2_testing import SMALL_OVERRIDES


def test_known_names_map_to_official_urls_and_configs(tmp_path):
    for name in ("MedSAM2_latest", "MedSAM2_2411", "MedSAM2_CTLesion", "MedSAM2_MRI_LiverLesion", "MedSAM2_US_Heart"):
        r = resolve_checkpoint(name, model_dir=tmp_path)
        assert r.url == f"https://huggingface.co/wanglab/MedSAM2/resolve/main/{name}.pt"
        assert r.config == MEDSAM2_CONFIG and r.path == tmp_path / f"{name}.pt"
    r = resolve_checkpoint("sam2.1_hiera_large", model_dir=tmp_path)
    assert r.url.endswith("/092824/sam2.1_hiera_large.pt") and r.config.name == "sam2.1_hiera_l.yaml"
    assert all(spec.config.exists() for spec in KNOWN_CHECKPOINTS.values())


def test_medsam2_config_is_hiera_t_at_512():
    model = build_model(MEDSAM2_CONFIG)
    assert model.image_size == 512
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(38.9e6, rel=0.02)


def test_round_trip_through_the_user_code_path(tmp_path):
    torch.manual_seed(3)
    model = build_model(MEDSAM2_CONFIG)
    path = tmp_path / "mine.pt"
    save_checkpoint(model, path)
    assert set(torch.load(path, weights_only=True)) == {"model"}
    loaded = load_model(resolve_checkpoint(str(path)))
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=False):
        assert k == k2 and torch.equal(a, b), k
    assert not loaded.training


def test_strict_load_rejects_wrong_architecture_and_garbage(tmp_path):
    small = build_model(MEDSAM2_CONFIG, extra_overrides=SMALL_OVERRIDES)
    state = small.state_dict()
    state.pop(next(iter(state)))
    torch.save({"model": state}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model(resolve_checkpoint(str(tmp_path / "missing.pt")))
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(resolve_checkpoint(str(tmp_path / "garbage.pt")))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="format"):
        load_model(resolve_checkpoint(str(tmp_path / "other.pt")))


def test_random_and_unknown_specs(tmp_path):
    assert resolve_checkpoint("random").is_random
    with pytest.raises(CheckpointError, match="neither a known name"):
        resolve_checkpoint("no_such_checkpoint_anywhere", model_dir=tmp_path)


def test_offline_download_names_the_file_to_place_by_hand(tmp_path):
    r = resolve_checkpoint("MedSAM2_latest", model_dir=tmp_path)
    offline = r.__class__(r.name, r.config, r.path, "http://127.0.0.1:9/MedSAM2_latest.pt")
    with pytest.raises(CheckpointError) as err:
        ensure_checkpoint_file(offline, timeout=2)
    message = str(err.value)
    assert str(tmp_path / "MedSAM2_latest.pt") in message and "offline" in message
    assert not list(Path(tmp_path).glob("*.part")) and not (tmp_path / "MedSAM2_latest.pt").exists()
