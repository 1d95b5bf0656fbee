"""MONAI Label training task: fine-tune on the datastore's final labels and publish to the running inferers."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from lib.atomic_files import remove_stale_temp_files, temp_pattern, write_json_atomic
from lib.engine.adapters import adapter_path, save_adapter
from lib.engine.checkpoints import ResolvedCheckpoint, load_model, save_checkpoint
from lib.engine.model_provider import ModelProvider
from lib.engine.preprocessing import IntensityWindow
from lib.training.data import load_study
from lib.training.distributed import DistributedContext, DistributedPlan, cpu_ranks_from_env, launch, plan_distributed
from lib.training.lease import exit_when_orphaned
from lib.training.loop import EpochReport, TrainResult, train
from lib.training.options import check_train_body, client_config, parse_train_settings
from lib.training.reference_set import (
    StudySplit,
    freeze_reference,
    read_reference_names,
    reference_file,
    split_studies,
)
from lib.training.settings import TrainSettings

logger = logging.getLogger(__name__)


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
        """``/info`` → ``trainers.medsam2.config``: every training option's default, as MONAI Label's clients read
        it (:func:`lib.training.options.client_config`)."""
        return client_config(self.defaults)

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def _settings(self, request: dict[str, Any]) -> TrainSettings:
        try:
            return parse_train_settings(request, self.defaults)
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from None

    def check_body(self, body: Any) -> None:
        """A ``POST /train`` body, checked in the server before a training process starts: ValueError if it
        holds unknown options or invalid values (type, NaN/Infinity, out of bounds, a malformed ``gpus``)."""
        check_train_body(body, self.defaults)
        try:
            self._plan({**self.config(), **body})
        except MONAILabelException as e:
            raise ValueError(e.msg) from None

    def _split(self, studies: list[tuple[str, str, str]], settings: TrainSettings) -> StudySplit:
        """Train / held-out / frozen reference studies."""
        assert self.provider.published is not None
        path = reference_file(self.provider.published)
        try:
            split = split_studies(studies, settings.val_fraction, read_reference_names(path))
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from None
        return split

    def _freeze_reference(self, split: StudySplit) -> None:
        """After the first completed run: its held-out studies become the frozen reference set."""
        if split.newly_frozen and self.provider.published is not None:
            path = reference_file(self.provider.published)
            freeze_reference(path, [name for name, _, _ in split.held_out])
            logger.info("froze %d held-out studies as the reference set in %s", len(split.held_out), path)

    def _plan(self, request: dict[str, Any]) -> DistributedPlan | None:
        try:
            return plan_distributed(
                request.get("multi_gpu", False),
                request.get("gpus", "all"),
                torch.cuda.device_count(),
                cpu_ranks_from_env(),
                torch.distributed.is_nccl_available(),
            )
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from None

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Train in this process, or with ``multi_gpu`` over several GPUs in one spawned process per GPU (DDP)."""
        if _started_by_server():
            exit_when_orphaned()  # a killed server released the training lock: this run must not publish
        settings = self._settings(request)
        plan = self._plan(request)
        items = sorted(datastore.datalist(), key=lambda d: str(d["image"]))
        if not items:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, "No final labels in the datastore: save some first."
            )
        studies = [(Path(d["image"]).name, str(d["image"]), str(d["label"])) for d in items]
        split = self._split(studies, settings)
        train_items, val_items = split.train, split.held_out
        device = torch.device(request.get("device") or self.provider.device)
        if (
            isinstance(request.get("device"), str)
            and request["device"].startswith("cuda")
            and not torch.cuda.is_available()
        ):
            device = torch.device("cpu")
        assert self.provider.published is not None
        job = _Job(
            settings=settings,
            checkpoint=self.provider.checkpoint,
            published=self.provider.published,
            stats_path=self.stats_path,
            window=self.window,
            train_items=train_items,
            val_items=val_items,
            reference_items=split.reference,
            provider_device_type=self.provider.device.type,
            provider_dtype=self.provider.compute_dtype,
            state={
                "status": "RUNNING",
                "started": time.time(),
                "total_epochs": settings.epochs,
                "train_studies": [name for name, _, _ in train_items],
                "val_studies": [name for name, _, _ in val_items],
                "reference_studies": [name for name, _, _ in split.reference],
                "checkpoint_start": str(self.provider.checkpoint.path or "random"),
                "published_to": str(self.provider.published),
                "world_size": plan.world_size if plan else 1,
                "devices": list(plan.devices) if plan else [str(device)],
                "settings": dataclasses.asdict(settings),
            },
        )
        write_json_atomic(self.stats_path, job.state)
        if plan is None:
            result = _run(job, device, None)
            self._freeze_reference(split)
            return result
        try:
            launch(plan, _distributed_worker, (job,))
        except Exception as e:  # a rank failed: the others were terminated, rank 0 may have died mid-write
            _remove_partial_files(job.published, self.stats_path)
            state = {**job.state, **self.stats()}
            state.update(status="FAILED", error=f"{type(e).__name__}: {e}", total_time=_elapsed(state))
            write_json_atomic(self.stats_path, state)
            raise
        self._freeze_reference(split)
        return self.stats()


def _started_by_server() -> bool:
    """This process is the training subprocess MONAI Label's server starts (``-m monailabel.interfaces.utils.app``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "monailabel.interfaces.utils.app"


@dataclass
class _Job:
    """Everything a training process needs (picklable: it is sent to spawned processes)."""

    settings: TrainSettings
    checkpoint: ResolvedCheckpoint
    published: Path
    stats_path: Path
    window: IntensityWindow
    train_items: list[tuple[str, str, str]]  # (name, image path, label path)
    val_items: list[tuple[str, str, str]]
    reference_items: list[tuple[str, str, str]]  # frozen: checked before publishing, never trained on
    provider_device_type: str
    provider_dtype: torch.dtype | None
    state: dict[str, Any]


def _elapsed(state: dict[str, Any]) -> float:
    return round(time.time() - float(state.get("started", time.time())), 1)


def _remove_partial_files(*paths: Path) -> None:
    """Temporary files that a process terminated in the middle of an atomic write left behind (those of a
    writer still alive, e.g. another training run, are left alone)."""
    for path in paths:
        remove_stale_temp_files(path.parent, temp_pattern(path))


def _run(job: _Job, device: torch.device, distributed: DistributedContext | None) -> dict[str, Any]:
    """Load the studies and the model, train; rank 0 (or the only process) writes the stats and publishes."""
    lead = distributed is None or distributed.rank == 0
    settings, state = job.settings, dict(job.state)
    dtype = job.provider_dtype if device.type == job.provider_device_type else None

    def write_state() -> None:
        if lead:
            write_json_atomic(job.stats_path, state)

    def publish(m: torch.nn.Module, report: EpochReport) -> None:
        extra = {"epoch": report.epoch, "val_dice": report.val_dice}
        if settings.train_parts == "lora":  # only the adapter, adapters/<name>.pt beside the published weights
            path = adapter_path(job.published, settings.adapter_name)
            save_adapter(m, path, job.checkpoint.name, settings.lora_rank, settings.lora_alpha, extra)
        else:
            path = job.published
            save_checkpoint(m, path, extra=extra)
        state["published_to"] = str(path)
        logger.info("published epoch %d (val Dice %.4f) to %s", report.epoch, report.val_dice, path)

    def on_epoch(report: EpochReport, result: TrainResult) -> None:
        state.update(
            epoch=report.epoch,
            progress=round(100 * report.epoch / settings.epochs, 1),
            best_dice=result.best_dice,
            best_metric=result.best_dice,  # what the Slicer plugin's accuracy bar reads
            best_epoch=result.best_epoch,
            initial_dice=result.initial["dice"],
            held_out_dice=report.val_dice,
            reference_dice_before=result.reference_before,
            reference_dice=result.reference_dice,
            held_out_other_overlap=report.val_other_overlap,
            other_overlap_before=result.initial.get("other_overlap"),
            reference_other_overlap_before=result.reference_overlap_before,
            skipped_steps=result.skipped_steps,
            rollbacks=result.rollbacks,
            not_published=result.not_published,
            stopped_early=result.stopped_early,
            epochs=[dataclasses.asdict(e) for e in result.epochs],
            # not total_time: the Slicer plugin reads it as "the run has ended" and resets its progress bar
            elapsed_time=_elapsed(state),
        )
        write_state()

    try:
        train_studies = [load_study(name, image, label, job.window) for name, image, label in job.train_items]
        # only rank 0 validates
        val_items = job.val_items if lead else []
        val_studies = [load_study(name, image, label, job.window) for name, image, label in val_items]
        reference_items = job.reference_items if lead else []
        reference = [load_study(name, image, label, job.window) for name, image, label in reference_items]
        model = load_model(job.checkpoint, device)
        result = train(
            model,
            train_studies,
            val_studies,
            settings,
            device,
            dtype,
            publish,
            on_epoch,
            distributed=distributed,
            reference_studies=reference,
        )
    except Exception as e:
        state.update(status="FAILED", error=f"{type(e).__name__}: {e}", total_time=_elapsed(state))
        write_state()
        raise
    state.update(
        status="DONE",
        total_time=_elapsed(state),
        published=result.published,
        stopped_early=result.stopped_early,
        not_published=result.not_published,
    )
    write_state()
    return result.as_json()


def _distributed_worker(context: DistributedContext, device: torch.device, job: _Job) -> None:
    """One rank of a multi-GPU run (started by :func:`lib.training.distributed.launch`)."""
    _run(job, device, context)
