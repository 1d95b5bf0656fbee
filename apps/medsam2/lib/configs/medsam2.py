"""Wiring for the MedSAM2 model: checkpoint, settings, the shared model and session cache, its tasks."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import torch
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask

from lib.engine.checkpoints import DEFAULT_CHECKPOINT, ResolvedCheckpoint, ensure_checkpoint_file, resolve_checkpoint
from lib.engine.model_provider import ModelProvider
from lib.engine.precision import compute_dtype_for, pick_device
from lib.engine.preprocessing import parse_window
from lib.engine.prompts import LabelMap
from lib.engine.propagation import StopRule
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings
from lib.engine.volume_session import SessionCache
from lib.infers.medsam2 import MedSAM2Infer
from lib.training.finetune import TrainSettings

logger = logging.getLogger(__name__)

DEFAULT_LABELS = {"lesion": 1, "organ": 2, "vessel": 3, "other": 4}
DEFAULT_STOP_RULE = "off"  # see bench/results/stop_rule_cpu.jsonl and the README


def _conf_int(conf: dict[str, str], key: str, default: int) -> int:
    try:
        return int(float(conf.get(key, default)))
    except (TypeError, ValueError):
        raise SystemExit(f"--conf {key} must be a number, got {conf.get(key)!r}") from None


class MedSAM2(TaskConfig):
    """``--conf checkpoint``, ``window``, ``labels``, ``device``, ``precision``, ``max_sessions``,
    ``max_session_gb``, ``max_voxels``, ``encode_batch``, ``model_config``, ``finetuned_checkpoint``,
    ``stop_rule``, ``slices_to_check``, and every training option (``epochs``, ``train_parts``, ``loss``, ...:
    the fields of :class:`lib.training.finetune.TrainSettings`)."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        try:
            self.labels = json.loads(conf.get("labels", "")) if conf.get("labels") else dict(DEFAULT_LABELS)
            LabelMap(self.labels)
        except (ValueError, TypeError) as e:
            example = '{"lesion":1,"organ":2}'
            raise SystemExit(f"--conf labels must be a JSON object without spaces like {example}: {e}") from None
        try:
            self.window = parse_window(conf.get("window", "auto"))
        except ValueError as e:
            raise SystemExit(str(e)) from None
        self.checkpoint: ResolvedCheckpoint = resolve_checkpoint(
            conf.get("checkpoint", DEFAULT_CHECKPOINT), model_dir=_path(model_dir), config=conf.get("model_config")
        )
        # Downloads once (cheap afterwards); an offline host fails here with the file to place by hand.
        ensure_checkpoint_file(self.checkpoint)
        self.path = str(self.checkpoint.path) if self.checkpoint.path else None
        device = pick_device(conf.get("device"))
        try:
            dtype = compute_dtype_for(device, conf.get("precision", "auto"))
        except ValueError as e:
            raise SystemExit(f"--conf precision: {e}") from None
        published = conf.get("finetuned_checkpoint") or os.path.join(model_dir, "medsam2_finetuned.pt")
        self.provider = ModelProvider(self.checkpoint, device, dtype, _path(published))
        cache = SessionCache(
            max_sessions=_conf_int(conf, "max_sessions", 4),
            max_bytes=int(float(conf.get("max_session_gb", 6)) * (1 << 30)),
        )
        settings = SegmenterSettings(
            window=self.window,
            labels=LabelMap(self.labels),
            max_voxels=_conf_int(conf, "max_voxels", 512 * 512 * 1200),
            encode_batch=_conf_int(conf, "encode_batch", 16 if device.type == "cuda" else 4),
            # the encoder's outputs are already in the compute dtype: storing them so loses nothing
            feature_dtype=dtype or torch.float32,
            stop_rule=_stop_rule(conf.get("stop_rule", DEFAULT_STOP_RULE)),
            slices_to_check=_conf_int(conf, "slices_to_check", 5),
        )
        self.segmenter = MedSAM2Segmenter(self.provider, settings, cache)

    def infer(self) -> InferTask | dict[str, InferTask]:
        info = {
            "checkpoint": self.checkpoint.name,
            "random_weights": self.checkpoint.is_random,
            "stop_rule": self.segmenter.settings.stop_rule is not None,
        }
        return {
            f"{self.name}_2d": MedSAM2Infer(self.segmenter, 2, self.labels, info),
            f"{self.name}_3d": MedSAM2Infer(self.segmenter, 3, self.labels, info),
        }

    def strategy(self):
        from lib.activelearning.uncertainty import PropagationUncertainty

        return {"medsam2_uncertainty": PropagationUncertainty(self.segmenter)}

    def trainer(self):
        from lib.trainers.medsam2 import MedSAM2Trainer

        defaults = _train_defaults(self.conf)
        stats = _path(os.path.join(self.model_dir, "train_stats_medsam2.json"))
        return MedSAM2Trainer(self.provider, self.window, stats, defaults)


def _train_defaults(conf: dict[str, str]) -> TrainSettings:
    """Every training option can be given as ``--conf <option> <value>`` (the request can still override it)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainSettings):
        if f.name in conf:
            kind = type(f.default)
            try:
                values[f.name] = _conf_int(conf, f.name, f.default) if kind is int else kind(conf[f.name])
            except (TypeError, ValueError):
                raise SystemExit(f"--conf {f.name} must be a {kind.__name__}, got {conf[f.name]!r}") from None
    try:
        return TrainSettings(**values)
    except ValueError as e:
        raise SystemExit(f"--conf: {e}") from None


def _stop_rule(text: str) -> StopRule | None:
    try:
        return StopRule.from_text(text)
    except ValueError as e:
        raise SystemExit(f"--conf {e}") from None


def _path(p: str):
    from pathlib import Path

    return Path(os.path.abspath(p))
