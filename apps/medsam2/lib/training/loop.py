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
from lib.training.clip_loss import ClipLoss, PreparedStep, prepare_step
from lib.training.data import Clip, Study, sample_clip
from lib.training.distributed import DistributedContext, any_rank, sum_over_ranks
from lib.training.prefetch import StepPrefetcher
from lib.training.settings import TRAIN_PARTS, TrainSettings
from lib.training.spike_guard import SpikeGuard
from lib.training.validation import evaluate

logger = logging.getLogger(__name__)


@dataclass
class EpochReport:
    """One epoch: its mean training loss, the validation scores after it (Dice, NSD and the overlap with objects
    not prompted), its speed, the steps the spike guard skipped or rolled back, whether it was the best so far on
    the held-out studies, and whether it was published (a best epoch is not when the publish guard refuses it:
    ``not_published`` says why)."""

    epoch: int
    train_loss: float
    val_dice: float
    val_nsd: float
    per_label: dict
    seconds: float
    slices_per_second: float
    best: bool
    reference_dice: float | None = None
    published: bool = False
    not_published: str = ""
    lr: float = 0.0
    train_slices: int = 0
    train_seconds: float = 0.0
    val_other_overlap: float | None = None
    reference_other_overlap: float | None = None
    skipped_steps: int = 0
    rollbacks: int = 0
    max_loss_ratio: float = 0.0  # the largest step loss over the running median of the steps before it


@dataclass
class TrainResult:
    """A run: the validation scores before training, each epoch's report, the best published epoch, the
    reference studies' Dice before training, and why the run stopped early or did not publish."""

    initial: dict
    epochs: list[EpochReport] = field(default_factory=list)
    best_dice: float = -1.0
    best_epoch: int = -1
    published: bool = False
    reference_before: float | None = None
    reference_dice: float | None = None  # of the published model
    stopped_early: str = ""
    not_published: str = ""
    reference_overlap_before: float | None = None
    skipped_steps: int = 0  # by the spike guard, over the run
    rollbacks: int = 0

    def as_json(self) -> dict:
        return {**asdict(self)}


def configure_trainable(model: torch.nn.Module, parts: str, settings: TrainSettings | None = None) -> list[dict]:
    """Freeze what ``parts`` excludes; parameter groups with MedSAM2's learning rates. ``lora``: adapters are
    added (``settings``' rank and alpha; default: TrainSettings') and only they train (see :func:`train_adapters`)."""
    if parts == "lora":
        return train_adapters(model, settings or TrainSettings(train_parts="lora"))
    frozen = TRAIN_PARTS[parts]
    encoder, rest = [], []
    for name, p in model.named_parameters():
        trainable = not any(name.startswith(f + ".") for f in frozen)
        p.requires_grad_(trainable)
        if trainable:
            (encoder if name.startswith("image_encoder.") else rest).append(p)
    return [g for g in ({"params": encoder, "name": "image_encoder"}, {"params": rest, "name": "rest"}) if g["params"]]


def train_adapters(model: torch.nn.Module, settings: TrainSettings) -> list[dict]:
    """``train_parts="lora"``: add LoRA adapters of ``settings.lora_rank``/``lora_alpha`` (unless the model has
    them), freeze every base weight; one parameter group, the adapters, trained at ``lr``."""
    from lib.engine.adapters import add_lora_adapters, has_adapters, is_adapter_weight

    if not has_adapters(model):
        add_lora_adapters(model, settings.lora_rank, settings.lora_alpha)
    adapters = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_weight(name))
        if p.requires_grad:
            adapters.append(p)
    return [{"params": adapters, "name": "adapters"}]


@dataclass
class _Optimisation:
    """The trained parameter groups, AdamW over them, and the learning-rate schedule."""

    groups: list[dict]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int  # optimiser steps per epoch on this rank
    clips_per_step: int
    guard: SpikeGuard = field(default_factory=lambda: SpikeGuard(0.0))

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.groups for p in g["params"]]

    def step(self, loss: torch.Tensor, grad_clip: float, agree: Callable[[bool], bool] = bool) -> bool:
        """Back-propagate ``loss`` and apply the step unless the spike guard calls it a spike (its gradients are
        dropped; the schedule advances either way). ``agree``: every rank's verdict (a collective under DDP, where
        every rank must skip together). False when skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # always (DDP reduces gradients during backward: every rank must run it)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, grad_clip))
        value = float(loss.detach())
        reason = self.guard.spike(value, norm)
        if agree(bool(reason)):
            self.optimizer.zero_grad(set_to_none=True)
            logger.warning("spike guard: step skipped (%s)", reason or "a spike on another process")
            if self.guard.reject(reason or "a spike on another process"):
                self.guard.roll_back(self.params, self.optimizer, self.schedule)
                logger.warning("spike guard: weights rolled back to the last snapshot, learning rate halved")
            self.schedule.step()
            return False
        self.optimizer.step()
        self.schedule.step()
        self.guard.accept(value, self.params, self.optimizer)
        return True


FINAL_LR_FRACTION = 0.05


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up to 1, then cosine decay to FINAL_LR_FRACTION."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = min(step - warmup_steps, total_steps - warmup_steps) / max(total_steps - warmup_steps, 1)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * decay))


def scaled_lr(lr: float, clips_per_step: int, world_size: int) -> float:
    """``lr`` is set for one clip per step on one process; larger batches take it times the square root of
    the batch (the rule for Adam-type optimisers: the gradient noise falls with the square root of the batch)."""
    return lr * math.sqrt(clips_per_step * world_size)


def clips_per_step_on(device: torch.device, setting: int) -> int:
    """``clips_per_step``, with 0 resolved by device: 4 on a GPU (a step of one clip leaves it idle between small
    kernels), 1 on a CPU (arithmetic-bound already: larger steps multiply memory and save little time)."""
    return setting or (4 if device.type == "cuda" else 1)


def _optimisation(
    model: torch.nn.Module, settings: TrainSettings, n_studies: int, world_size: int, device: torch.device
) -> _Optimisation:
    """Freeze what the settings exclude; an epoch's clips are split across the ranks and into steps of
    ``clips_per_step`` clips (rounded up)."""
    groups = configure_trainable(model, settings.train_parts, settings)
    clips_per_step = clips_per_step_on(device, settings.clips_per_step)
    for g in groups:
        base = settings.lr_image_encoder if g["name"] == "image_encoder" else settings.lr
        g["lr"] = scaled_lr(base, clips_per_step, world_size)
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    clips = settings.steps_per_epoch or max(4 * n_studies, 1)
    steps = math.ceil(clips / (world_size * clips_per_step))
    total_steps = steps * settings.epochs
    warmup = round(settings.warmup_fraction * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))
    return _Optimisation(groups, optimizer, schedule, steps, clips_per_step, SpikeGuard(settings.spike_factor))


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
    skipped_steps: int = 0  # by the spike guard (the same on every rank)
    rollbacks: int = 0
    max_loss_ratio: float = 0.0  # this rank's


@dataclass
class _Training:
    """What every epoch uses."""

    model: torch.nn.Module
    step_loss: torch.nn.Module  # ClipLoss, DDP-wrapped when distributed
    optimisation: _Optimisation
    studies: list[Study]  # those with a labelled voxel
    settings: TrainSettings
    rng: np.random.Generator  # the correction clicks (they depend on the predictions)
    sample_rng: np.random.Generator  # clips and their prompts, drawn ahead by the prefetch thread
    device: torch.device
    should_stop: Callable[[], bool] | None
    distributed: DistributedContext | None
    steps: StepPrefetcher[PreparedStep] | None = None

    def stop_requested(self) -> bool:
        """Asked by ``should_stop`` here or, when distributed, on any rank."""
        stop = bool(self.should_stop and self.should_stop())
        return any_rank(stop, self.device) if self.distributed else stop

    def sample_clip(self) -> Clip:
        s = self.settings
        clip = None
        while clip is None:
            study = self.studies[int(self.sample_rng.integers(len(self.studies)))]
            clip = sample_clip(study, s.clip_length, s.max_objects, self.sample_rng, s.p_cross_end)
        return clip

    def prepare_step(self) -> PreparedStep:
        """The next step's clips, batch layout and prompts (run in the prefetch thread)."""
        clips = [self.sample_clip() for _ in range(self.optimisation.clips_per_step)]
        return prepare_step(clips, self.settings, self.sample_rng, self.model.image_size)

    def run_epoch(self) -> _Epoch | None:
        """Train on this epoch's clips; None when a stop was requested."""
        self.model.train()
        t0 = time.perf_counter()
        losses, slices = [], 0
        for _ in range(self.optimisation.steps_per_epoch):
            if self.stop_requested():
                return None
            step = self.steps.next() if self.steps else self.prepare_step()
            loss = self.step_loss(step, self.rng)
            self.optimisation.step(loss, self.settings.grad_clip, self.agree)
            losses.append(float(loss.detach()))
            slices += step.slices
        train_seconds = time.perf_counter() - t0
        loss_sum, n_losses = float(np.sum(losses)), len(losses)
        if self.distributed:
            loss_sum, n_losses, slices = sum_over_ranks([loss_sum, n_losses, slices], self.device)
        return _Epoch(loss_sum, n_losses, slices, train_seconds, *self.optimisation.guard.reset_epoch())

    def agree(self, flag: bool) -> bool:
        """``flag`` on any rank (the spike guard's verdict must be the same everywhere)."""
        return any_rank(flag, self.device) if self.distributed else flag


@dataclass
class PublishGuard:
    """Do no harm, and keep following prompts. A better held-out epoch is published only if, against the model the
    run started from: on the reference studies (labelled before this run, never trained on in it) its Dice has not
    dropped by more than ``max_drop``, and on the reference and the held-out studies the overlap of its answers with
    the objects that were not prompted (``other_overlap``, see :mod:`lib.training.validation`) has not risen by more
    than ``max_overlap_rise``. Scores without that overlap (studies of one object each) are not checked for it."""

    studies: Sequence[Study]
    max_drop: float
    max_overlap_rise: float = 1.0
    before: dict | None = None  # the starting model's scores on the reference studies
    held_out_before: dict | None = None  # and on the held-out studies

    def refusal(self, reference: dict | None, held_out: dict | None = None) -> str:
        """Why a model with these scores must not be published ("" when it may)."""
        reasons = []
        if reference is not None and self.before is not None:
            where = f"the {len(self.studies)} reference studies"
            if reference["dice"] < self.before["dice"] - self.max_drop:
                reasons.append(
                    f"Dice on {where} fell from {self.before['dice']:.4f} to {reference['dice']:.4f}, "
                    f"more than the allowed {self.max_drop:g} (publish_max_drop)"
                )
            reasons.append(self._overlap_rise(self.before, reference, where))
        if held_out is not None and self.held_out_before is not None:
            reasons.append(self._overlap_rise(self.held_out_before, held_out, "the held-out studies"))
        return "; ".join(r for r in reasons if r)

    def _overlap_rise(self, before: dict, after: dict, where: str) -> str:
        was, now = before.get("other_overlap"), after.get("other_overlap")
        if was is None or now is None or now <= was + self.max_overlap_rise:
            return ""
        return (
            f"the answers' overlap with objects that were not prompted rose from {was:.4f} to {now:.4f} on {where}, "
            f"more than the allowed {self.max_overlap_rise:g} (publish_max_overlap_rise): the model follows the "
            "prompts less"
        )


def _consider_publishing(
    report: EpochReport, result: TrainResult, model, publish: Callable, guard: PublishGuard, validate: Callable
) -> None:
    """Publish a best epoch unless the guard refuses it; note the outcome in ``report`` and ``result``."""
    if not report.best:
        return
    reference = validate(guard.studies) if guard.studies else None
    if reference is not None:
        report.reference_dice = reference["dice"]
        report.reference_other_overlap = reference.get("other_overlap")
    held_out = {"dice": report.val_dice, "other_overlap": report.val_other_overlap}
    report.not_published = guard.refusal(reference, held_out)
    if report.not_published:
        result.not_published = f"epoch {report.epoch}: {report.not_published}"
        logger.warning("not published: %s", result.not_published)
        return
    result.best_dice, result.best_epoch = report.val_dice, report.epoch
    result.reference_dice = report.reference_dice
    publish(model, report)
    report.published = result.published = True
    result.not_published = ""


def _log_epoch(report: EpochReport, epochs: int) -> None:
    logger.info(
        "epoch %d/%d loss %.4f val Dice %.4f NSD %.4f%s (%.1f slices/s, lr %.2e)%s",
        report.epoch,
        epochs,
        report.train_loss,
        report.val_dice,
        report.val_nsd,
        "" if report.reference_dice is None else f" reference Dice {report.reference_dice:.4f}",
        report.slices_per_second,
        report.lr,
        " [published]" if report.published else (" [not published]" if report.not_published else ""),
    )


@dataclass
class _EarlyStop:
    """Stop after ``patience`` epochs in a row without a better held-out Dice (0: never)."""

    patience: int
    best: float
    stale: int = 0

    def update(self, dice: float) -> bool:
        if dice > self.best:
            self.best, self.stale = dice, 0
        else:
            self.stale += 1
        return 0 < self.patience <= self.stale


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
    reference_studies: Sequence[Study] = (),
) -> TrainResult:
    """Fine-tune ``model`` in place; ``publish`` is called with the model whenever validation Dice improves,
    unless the Dice on ``reference_studies`` fell by more than ``settings.publish_max_drop`` (see PublishGuard).
    The run stops early after ``settings.patience`` epochs without a better validation Dice.

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
    optimisation = _optimisation(model, settings, len(train_studies), world_size, device)
    autocast = autocast_for(device, compute_dtype)
    usable = _labelled(train_studies)
    guard = PublishGuard(list(reference_studies), settings.publish_max_drop, settings.publish_max_overlap_rise)

    def validate(studies: Sequence[Study]) -> dict:
        return evaluate(model, studies, device, compute_dtype, settings.nsd_tolerance_mm)

    result = TrainResult(initial={})
    if lead:
        result.initial = guard.held_out_before = validate(val_studies)
        result.best_dice = result.initial["dice"]
        if guard.studies:
            guard.before = validate(guard.studies)
            result.reference_before = guard.before["dice"]
            result.reference_overlap_before = guard.before.get("other_overlap")
        logger.info("validation before training: Dice %.4f NSD %.4f", result.initial["dice"], result.initial["nsd"])
    step_loss = _step_loss(ClipLoss(model, settings, device, autocast), distributed)
    sample_rng = np.random.default_rng([settings.seed, rank, 1])
    training = _Training(
        model, step_loss, optimisation, usable, settings, rng, sample_rng, device, should_stop, distributed
    )
    with StepPrefetcher(training.prepare_step) as training.steps:
        _run_epochs(training, result, val_studies, validate, guard, publish, on_epoch, lead)
    return result


def _run_epochs(
    training: _Training,
    result: TrainResult,
    val_studies: Sequence[Study],
    validate: Callable,
    guard: PublishGuard,
    publish: Callable,
    on_epoch: Callable | None,
    lead: bool,
) -> None:
    """Train epoch after epoch (until the last one, a stop request, or early stopping); rank 0 validates,
    publishes and reports."""
    settings, model, optimisation = training.settings, training.model, training.optimisation
    early = _EarlyStop(settings.patience, result.best_dice)
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        trained = training.run_epoch()
        if trained is None:
            return
        stop = False
        if lead:
            report = _epoch_report(epoch, trained, validate(val_studies), t0, result, optimisation)
            result.skipped_steps += report.skipped_steps
            result.rollbacks += report.rollbacks
            _consider_publishing(report, result, model, publish, guard, validate)
            result.epochs.append(report)
            _log_epoch(report, settings.epochs)
            stop = early.update(report.val_dice) and epoch < settings.epochs
            if stop:
                result.stopped_early = f"no better validation Dice in the last {settings.patience} epochs"
                logger.info("stopping early after epoch %d: %s", epoch, result.stopped_early)
            if on_epoch:
                on_epoch(report, result)
        if any_rank(stop, training.device) if training.distributed else stop:
            return


def _epoch_report(
    epoch: int, trained: _Epoch, scores: dict, t0: float, result: TrainResult, optimisation: _Optimisation
) -> EpochReport:
    return EpochReport(
        epoch,
        trained.loss_sum / max(trained.n_losses, 1),
        scores["dice"],
        scores["nsd"],
        scores["per_label"],
        round(time.perf_counter() - t0, 3),
        round(trained.slices / max(trained.train_seconds, 1e-9), 2),
        best=scores["dice"] > result.best_dice,
        lr=optimisation.optimizer.param_groups[-1]["lr"],
        train_slices=int(trained.slices),
        train_seconds=round(trained.train_seconds, 3),
        val_other_overlap=scores.get("other_overlap"),
        skipped_steps=trained.skipped_steps,
        rollbacks=trained.rollbacks,
        max_loss_ratio=round(trained.max_loss_ratio, 3),
    )
