"""MONAI Label training task: fine-tune on the datastore's final labels and publish to the running inferers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from lib.checkpoints import load_model, save_checkpoint
from lib.finetune import EpochReport, TrainResult, TrainSettings, load_study, train
from lib.model_provider import ModelProvider
from lib.preprocessing import IntensityWindow

logger = logging.getLogger(__name__)

_CONFIG_KEYS = [f.name for f in dataclasses.fields(TrainSettings)]


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


class MedSAM2Trainer(TrainTask):
    """``POST /train/medsam2``: clips from final labels, SAM2's loss, propagated Dice/NSD validation each epoch;
    the best weights are written atomically to the published checkpoint that the inferers reload."""

    def __init__(self, provider: ModelProvider, window: IntensityWindow, stats_path: Path, defaults: TrainSettings):
        super().__init__("Fine-tune MedSAM2/SAM2 on the final labels of the datastore")
        self.provider = provider
        self.window = window
        self.stats_path = stats_path
        self.defaults = defaults

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.defaults)

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def _settings(self, request: dict[str, Any]) -> TrainSettings:
        values = dataclasses.asdict(self.defaults)
        for key in _CONFIG_KEYS:
            if key in request and request[key] not in (None, ""):
                kind = type(values[key])
                try:
                    values[key] = kind(request[key])
                except (TypeError, ValueError):
                    raise MONAILabelException(
                        MONAILabelError.INVALID_INPUT,
                        f"train option {key} must be a {kind.__name__}, got {request[key]!r}",
                    ) from None
        try:
            return TrainSettings(**values)
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from None

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        settings = self._settings(request)
        items = sorted(datastore.datalist(), key=lambda d: str(d["image"]))
        if not items:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, "No final labels in the datastore: save some first."
            )
        studies = [load_study(Path(d["image"]).name, str(d["image"]), str(d["label"]), self.window) for d in items]
        n_val = max(1, round(len(studies) * settings.val_fraction)) if len(studies) > 1 else 0
        train_studies, val_studies = studies[: len(studies) - n_val], studies[len(studies) - n_val :]
        if not val_studies:  # a single study: validate on it (better than no signal at all)
            val_studies = studies
        device = torch.device(request.get("device") or self.provider.device)
        if (
            isinstance(request.get("device"), str)
            and request["device"].startswith("cuda")
            and not torch.cuda.is_available()
        ):
            device = torch.device("cpu")
        dtype = self.provider.compute_dtype if device.type == self.provider.device.type else None
        model = load_model(self.provider.checkpoint, device)
        started = time.time()
        state = {
            "status": "RUNNING",
            "started": started,
            "total_epochs": settings.epochs,
            "train_studies": [s.name for s in train_studies],
            "val_studies": [s.name for s in val_studies],
            "checkpoint_start": str(self.provider.checkpoint.path or "random"),
            "published_to": str(self.provider.published),
            "settings": dataclasses.asdict(settings),
        }
        _write_json(self.stats_path, state)

        def publish(m: torch.nn.Module, report: EpochReport) -> None:
            assert self.provider.published is not None
            save_checkpoint(m, self.provider.published, extra={"epoch": report.epoch, "val_dice": report.val_dice})
            logger.info(
                "published epoch %d (val Dice %.4f) to %s", report.epoch, report.val_dice, self.provider.published
            )

        def on_epoch(report: EpochReport, result: TrainResult) -> None:
            state.update(
                epoch=report.epoch,
                progress=round(100 * report.epoch / settings.epochs, 1),
                best_dice=result.best_dice,
                best_epoch=result.best_epoch,
                initial_dice=result.initial["dice"],
                epochs=[dataclasses.asdict(e) for e in result.epochs],
                total_time=round(time.time() - started, 1),
            )
            _write_json(self.stats_path, state)

        try:
            result = train(model, train_studies, val_studies, settings, device, dtype, publish, on_epoch)
        except Exception as e:
            state.update(status="FAILED", error=f"{type(e).__name__}: {e}", total_time=round(time.time() - started, 1))
            _write_json(self.stats_path, state)
            raise
        state.update(status="DONE", total_time=round(time.time() - started, 1), published=result.published)
        _write_json(self.stats_path, state)
        return result.as_json()
