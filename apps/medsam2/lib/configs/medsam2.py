"""Wiring for the MedSAM2 model: checkpoint, settings, the shared model and session cache, its tasks."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.engine.adapters import adapter_path
from lib.engine.checkpoints import ResolvedCheckpoint, ensure_checkpoint_file, resolve_checkpoint
from lib.engine.model_provider import ModelProvider
from lib.engine.precision import compute_dtype_for, pick_device
from lib.engine.prompts import LabelMap
from lib.engine.propagation import TrackingOptions
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings
from lib.engine.session_limits import SessionLimits
from lib.engine.volume_session import SessionCache
from lib.infers.medsam2 import MedSAM2Infer
from lib.server.served_models import ModelConfig
from lib.server.server_process import in_server
from lib.settings import AppSettings, parse_settings

logger = logging.getLogger(__name__)


class MedSAM2(ModelConfig):
    """The MedSAM2 model; reads the app's parsed ``--conf`` settings (:mod:`lib.settings`)."""

    def init(
        self,
        name: str,
        model_dir: str,
        conf: dict[str, str],
        planner: Any,
        settings: AppSettings | None = None,
        **kwargs,
    ):
        """``settings``: the app's parsed ``--conf`` (parsed here when the config is used on its own)."""
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = s = settings or parse_settings(conf)
        self.labels = dict(s.labels)
        self.window = s.window
        self.checkpoint: ResolvedCheckpoint = resolve_checkpoint(
            s.checkpoint, model_dir=_path(model_dir), config=s.model_config
        )
        # Downloads once (cheap afterwards); an offline host fails here with the file to place by hand.
        ensure_checkpoint_file(self.checkpoint, expected_sha256=s.checkpoint_sha256)
        self.path = str(self.checkpoint.path) if self.checkpoint.path else None
        device = pick_device(s.device)
        dtype = compute_dtype_for(device, s.precision)
        published = s.finetuned_checkpoint or _path(os.path.join(model_dir, "medsam2_finetuned.pt"))
        adapter = adapter_path(published, s.adapter) if s.adapter else None  # adapters/<name>.pt beside it
        self.provider = ModelProvider(self.checkpoint, device, dtype, published, adapter, s.cpu_tracking, s.cpu_encoder)
        cache = SessionCache(max_sessions=s.max_sessions, max_bytes=int(s.max_session_gb * (1 << 30)))
        segmenter_settings = SegmenterSettings(
            window=self.window,
            labels=LabelMap(self.labels),
            max_voxels=s.max_voxels,
            encode_batch=s.encode_batch,
            # the encoder's outputs are already in the compute dtype: storing them so loses nothing
            feature_dtype=dtype or torch.float32,
            stop_rule=s.stop_rule,
            slices_to_check=s.slices_to_check,
            scribble_mode=s.scribble_mode,
            undo_levels=s.undo_levels,
            tracking=TrackingOptions(
                region=s.tracking_region,
                margin=s.tracking_margin,
                overflow=s.tracking_overflow,
                max_key_slices=s.max_key_slices,
                workers=s.tracking_workers,
                keep_memory=s.local_corrections is not None,
            ),
            local_corrections=s.local_corrections,
        )
        # the background encoder runs inside the server only (not in a training process or a script)
        encode_ahead = s.encode_ahead == "on" and in_server()
        limits = SessionLimits(s.max_live_sessions, s.session_idle_timeout_s, reap_in_background=in_server())
        self.segmenter = MedSAM2Segmenter(
            self.provider, segmenter_settings, cache, encode_ahead=encode_ahead, limits=limits
        )

    def infer(self) -> dict[str, InferTask]:
        info = {
            "checkpoint": self.checkpoint.name,
            "random_weights": self.checkpoint.is_random,
            "stop_rule": self.segmenter.settings.stop_rule is not None,
        }
        return {
            f"{self.name}_2d": MedSAM2Infer(self.segmenter, 2, self.labels, info),
            f"{self.name}_3d": MedSAM2Infer(self.segmenter, 3, self.labels, info),
            f"{self.name}_scribbles": MedSAM2Infer(self.segmenter, 3, self.labels, info, scribbles=True),
        }

    def strategy(self) -> dict[str, Strategy]:
        from lib.activelearning.uncertainty import PropagationUncertainty

        return {"medsam2_uncertainty": PropagationUncertainty(self.segmenter)}

    def trainer(self) -> TrainTask:
        from lib.trainers.medsam2 import MedSAM2Trainer

        # beside the published weights they describe: replicas that share those share the stats too
        assert self.provider.published is not None
        stats = self.provider.published.parent / "train_stats_medsam2.json"
        return MedSAM2Trainer(self.provider, self.window, stats, self.settings.train)


def _path(p: str):
    from pathlib import Path

    return Path(os.path.abspath(p))
