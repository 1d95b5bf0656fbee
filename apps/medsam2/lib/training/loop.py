"""The fine-tuning loop, as SAM2/MedSAM2 train: clips of consecutive slices, several objects per clip, a
simulated annotator, SAM2's own loss; validated after every epoch the way users segment, and published
whenever validation Dice improves. No MONAI Label imports.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lib.engine.precision import autocast_for
from lib.training.clip_loss import ClipLoss
from lib.training.data import Clip, Study, sample_clip
from lib.training.distributed import DistributedContext, any_rank, sum_over_ranks
from lib.training.settings import TRAIN_PARTS, TrainSettings
from lib.training.validation import evaluate

logger = logging.getLogger(__name__)


@dataclass
class EpochReport:
    """One epoch: its mean training loss, the validation scores after it, its speed, and whether it was
    the best so far (and so published)."""

    epoch: int
    train_loss: float
    val_dice: float
    val_nsd: float
    per_label: dict
    seconds: float
    slices_per_second: float
    best: bool


@dataclass
class TrainResult:
    """A run: the validation scores before training, each epoch's report, and the best epoch."""

    initial: dict
    epochs: list[EpochReport] = field(default_factory=list)
    best_dice: float = -1.0
    best_epoch: int = -1
    published: bool = False

    def as_json(self) -> dict:
        return {**asdict(self)}


def configure_trainable(model: torch.nn.Module, parts: str) -> list[dict]:
    """Freeze what ``parts`` excludes; parameter groups with MedSAM2's learning rates."""
    frozen = TRAIN_PARTS[parts]
    encoder, rest = [], []
    for name, p in model.named_parameters():
        trainable = not any(name.startswith(f + ".") for f in frozen)
        p.requires_grad_(trainable)
        if trainable:
            (encoder if name.startswith("image_encoder.") else rest).append(p)
    return [g for g in ({"params": encoder, "name": "image_encoder"}, {"params": rest, "name": "rest"}) if g["params"]]


@dataclass
class _Optimisation:
    """The trained parameter groups, AdamW over them, and its cosine learning-rate schedule."""

    groups: list[dict]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int  # on this rank

    def step(self, loss: torch.Tensor, grad_clip: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], grad_clip)
        self.optimizer.step()
        self.schedule.step()


def _optimisation(model: torch.nn.Module, settings: TrainSettings, n_studies: int, world_size: int) -> _Optimisation:
    """Freeze what the settings exclude; an epoch's clips are split across the ranks (rounded up)."""
    groups = configure_trainable(model, settings.train_parts)
    for g in groups:
        g["lr"] = settings.lr_image_encoder if g["name"] == "image_encoder" else settings.lr
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    steps = math.ceil((settings.steps_per_epoch or max(4 * n_studies, 1)) / world_size)
    total_steps = steps * settings.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    return _Optimisation(groups, optimizer, schedule, steps)


def _labelled(studies: Sequence[Study]) -> list[Study]:
    usable = [s for s in studies if s.label.any()]
    if not usable:
        raise ValueError("none of the training studies has a labelled voxel")
    return usable


def _step_loss(clip_loss: ClipLoss, distributed: DistributedContext | None) -> torch.nn.Module:
    if not distributed:
        return clip_loss
    # Frozen parameters (requires_grad False) are ignored by DDP; among the trainable ones some get no
    # gradient in a given step (e.g. the box-corner embeddings in a clicks-only step): find them each step.
    # The buffers never change during training: synced once at the start, not before every forward.
    return torch.nn.parallel.DistributedDataParallel(clip_loss, find_unused_parameters=True, forward_sync_buffers=False)


@dataclass
class _Epoch:
    """What an epoch trained on, summed over the ranks when distributed."""

    loss_sum: float
    n_losses: float
    slices: float
    train_seconds: float  # this rank's


@dataclass
class _Training:
    """What every epoch uses."""

    model: torch.nn.Module
    step_loss: torch.nn.Module  # ClipLoss, DDP-wrapped when distributed
    optimisation: _Optimisation
    studies: list[Study]  # those with a labelled voxel
    settings: TrainSettings
    rng: np.random.Generator
    device: torch.device
    should_stop: Callable[[], bool] | None
    distributed: DistributedContext | None

    def stop_requested(self) -> bool:
        """Asked by ``should_stop`` here or, when distributed, on any rank."""
        stop = bool(self.should_stop and self.should_stop())
        return any_rank(stop, self.device) if self.distributed else stop

    def sample_clip(self) -> Clip:
        s = self.settings
        clip = None
        while clip is None:
            study = self.studies[int(self.rng.integers(len(self.studies)))]
            clip = sample_clip(study, s.clip_length, s.max_objects, self.rng, s.p_cross_end)
        return clip

    def run_epoch(self) -> _Epoch | None:
        """Train on this epoch's clips; None when a stop was requested."""
        self.model.train()
        t0 = time.perf_counter()
        losses, slices = [], 0
        for _ in range(self.optimisation.steps_per_epoch):
            if self.stop_requested():
                return None
            clip = self.sample_clip()
            loss = self.step_loss(clip, self.rng)
            self.optimisation.step(loss, self.settings.grad_clip)
            losses.append(float(loss.detach()))
            slices += clip.frames.shape[0]
        train_seconds = time.perf_counter() - t0
        loss_sum, n_losses = float(np.sum(losses)), len(losses)
        if self.distributed:
            loss_sum, n_losses, slices = sum_over_ranks([loss_sum, n_losses, slices], self.device)
        return _Epoch(loss_sum, n_losses, slices, train_seconds)


def _record_epoch(
    result: TrainResult, report: EpochReport, model: torch.nn.Module, publish: Callable, epochs: int
) -> None:
    """Add the epoch to ``result``; publish the model if it is the best so far."""
    result.epochs.append(report)
    if report.best:
        result.best_dice, result.best_epoch = report.val_dice, report.epoch
        publish(model, report)
        result.published = True
    logger.info(
        "epoch %d/%d loss %.4f val Dice %.4f NSD %.4f (%.1f slices/s)%s",
        report.epoch,
        epochs,
        report.train_loss,
        report.val_dice,
        report.val_nsd,
        report.slices_per_second,
        " [published]" if report.best else "",
    )


def train(
    model: torch.nn.Module,
    train_studies: Sequence[Study],
    val_studies: Sequence[Study],
    settings: TrainSettings,
    device: torch.device,
    compute_dtype: torch.dtype | None,
    publish: Callable[[torch.nn.Module, EpochReport], None],
    on_epoch: Callable[[EpochReport, TrainResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    distributed: DistributedContext | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place; ``publish`` is called with the model whenever validation Dice improves.

    ``distributed``: this process is one rank of an initialised process group (see :mod:`lib.training.distributed`).
    Each rank samples its own clips (seed + rank), an epoch's ``steps_per_epoch`` clips are split across the
    ranks (rounded up to a multiple of the world size), DDP averages the gradients, and a stop requested on any
    rank stops all of them. Only rank 0 validates, publishes and calls ``on_epoch``; its epoch reports carry
    the loss averaged over all ranks and the slices/s of the whole group.
    """
    rank, world_size = (distributed.rank, distributed.world_size) if distributed else (0, 1)
    lead = rank == 0
    rng = np.random.default_rng(settings.seed + rank)
    torch.manual_seed(settings.seed + rank)
    optimisation = _optimisation(model, settings, len(train_studies), world_size)
    autocast = autocast_for(device, compute_dtype)
    usable = _labelled(train_studies)

    def validate() -> dict:
        return evaluate(model, val_studies, device, compute_dtype, settings.nsd_tolerance_mm)

    result = TrainResult(initial={})
    if lead:
        result.initial = validate()
        result.best_dice = result.initial["dice"]
        logger.info("validation before training: Dice %.4f NSD %.4f", result.initial["dice"], result.initial["nsd"])
    step_loss = _step_loss(ClipLoss(model, settings, device, autocast), distributed)
    training = _Training(model, step_loss, optimisation, usable, settings, rng, device, should_stop, distributed)
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        trained = training.run_epoch()
        if trained is None:
            return result
        if not lead:
            continue
        scores = validate()
        report = EpochReport(
            epoch,
            trained.loss_sum / max(trained.n_losses, 1),
            scores["dice"],
            scores["nsd"],
            scores["per_label"],
            round(time.perf_counter() - t0, 3),
            round(trained.slices / max(trained.train_seconds, 1e-9), 2),
            best=scores["dice"] > result.best_dice,
        )
        _record_epoch(result, report, model, publish, settings.epochs)
        if on_epoch:
            on_epoch(report, result)
    return result
