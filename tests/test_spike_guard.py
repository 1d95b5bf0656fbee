"""The spike guard of training (lib/training/spike_guard.py): a step whose loss explodes against its running median
is skipped (weights and optimiser state untouched), several in a row roll the weights back and halve the learning
rate, ordinary steps are exactly plain AdamW steps, and the training loop counts what it skipped."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lib.training import loop
from lib.training.loop import _Optimisation, train, warmup_cosine
from lib.training.settings import TrainSettings
from lib.training.spike_guard import MAX_SKIPS_IN_A_ROW, MIN_HISTORY, SNAPSHOT_EVERY, SpikeGuard
from lib.training.synthetic import VolumeRecipe, generate_studies
from sam2_testing import APP_DIR

REFERENCE_CONFIG = APP_DIR / "model" / "configs" / "reference_sam2.yaml"
CPU = torch.device("cpu")


def toy_optimisation(factor: float, seed: int = 0) -> tuple[torch.nn.Module, _Optimisation]:
    """A small regression model under the loop's optimisation (AdamW, warm-up and cosine schedule, guard)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    groups = [{"params": list(net.parameters()), "name": "rest", "lr": 1e-2}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, 200, 5))
    return net, _Optimisation(groups, optimizer, schedule, 200, 1, SpikeGuard(factor))


def batch_loss(net: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=g)
    y = x.sum(dim=1, keepdim=True).tanh()
    return torch.nn.functional.mse_loss(net(x), y) + 0.1  # + 0.1: the median stays away from 0


def weights(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_ordinary_steps_are_plain_adamw_steps():
    guarded_net, guarded = toy_optimisation(factor=5.0)
    plain_net, plain = toy_optimisation(factor=0.0)
    for step in range(40):
        assert guarded.step(batch_loss(guarded_net, step), grad_clip=1.0)
        plain.step(batch_loss(plain_net, step), grad_clip=1.0)
    assert same(weights(guarded_net), weights(plain_net))
    assert guarded.guard.skipped == guarded.guard.rollbacks == 0
    assert guarded.optimizer.param_groups[0]["lr"] == plain.optimizer.param_groups[0]["lr"]


def test_a_forced_spike_is_skipped_and_leaves_weights_and_optimiser_state_untouched():
    net, opt = toy_optimisation(factor=5.0)
    for step in range(MIN_HISTORY + 5):
        opt.step(batch_loss(net, step), grad_clip=1.0)
    before, state = weights(net), {k: v.clone() for k, v in opt.optimizer.state[net[0].weight].items()}
    lr_step = opt.schedule.last_epoch
    assert not opt.step(batch_loss(net, 99) * 100, grad_clip=1.0)  # the loss exploded: skipped
    assert same(weights(net), before)
    assert all(torch.equal(state[k], v) for k, v in opt.optimizer.state[net[0].weight].items())
    assert opt.guard.skipped == 1 and "running median" in opt.guard.last_spike
    assert opt.schedule.last_epoch == lr_step + 1  # the schedule keeps its pace
    assert opt.step(batch_loss(net, 100), grad_clip=1.0) and not same(weights(net), before)


def test_spikes_in_a_row_roll_the_weights_back_to_the_snapshot_and_halve_the_learning_rate():
    net, opt = toy_optimisation(factor=5.0)
    for step in range(SNAPSHOT_EVERY + 3):  # a snapshot is taken after the first accepted step of each period
        opt.step(batch_loss(net, step), grad_clip=1.0)
    snapshot = [p.clone() for p in opt.guard.snapshot.params]
    lr_before = opt.optimizer.param_groups[0]["lr"]
    for step in range(MAX_SKIPS_IN_A_ROW):
        assert not opt.step(batch_loss(net, 1000 + step) * 100, grad_clip=1.0)
    assert opt.guard.rollbacks == 1 and opt.guard.skipped == MAX_SKIPS_IN_A_ROW
    assert same(weights(net), snapshot)
    lr_after = opt.optimizer.param_groups[0]["lr"]
    assert lr_after < lr_before / 1.9  # halved (and the schedule moved on a few steps)
    assert opt.step(batch_loss(net, 2000), grad_clip=1.0)  # training goes on from the snapshot


def test_a_non_finite_loss_is_skipped_even_with_the_guard_off():
    net, opt = toy_optimisation(factor=0.0)
    opt.step(batch_loss(net, 0), grad_clip=1.0)
    before = weights(net)
    assert not opt.step(batch_loss(net, 1) * float("nan"), grad_clip=1.0)
    assert same(weights(net), before) and opt.guard.skipped == 1 and "not finite" in opt.guard.last_spike
    assert all(math.isfinite(float(p.detach().sum())) for p in net.parameters())


def test_guard_judges_only_after_enough_history_and_by_the_median():
    guard = SpikeGuard(3.0)
    assert guard.spike(100.0, 1.0) == ""  # no history yet: the first steps of a run change fast
    for loss in [1.0] * (MIN_HISTORY - 1) + [50.0]:  # one outlier does not move the median
        guard.losses.append(loss)
    assert guard.spike(2.9, 1.0) == "" and "3 x the running median 1" in guard.spike(3.1, 1.0)
    assert guard.max_loss_ratio == pytest.approx(3.1)


@pytest.mark.slow
def test_training_loop_counts_skipped_steps_in_the_epoch_report(monkeypatch):
    """The real loop on the reference architecture (random init): a loss forced up 1000x on one step is skipped and
    counted in that epoch's report and the run's totals; the other epochs skip nothing."""
    calls = {"n": 0}
    real = loop.ClipLoss

    class SpikyLoss(real):
        def forward(self, step, rng):
            calls["n"] += 1
            loss = super().forward(step, rng)
            return loss * 1000 if calls["n"] == 2 * MIN_HISTORY + 3 else loss

    monkeypatch.setattr(loop, "ClipLoss", SpikyLoss)
    from lib.engine.checkpoints import build_model

    torch.manual_seed(0)
    model = build_model(REFERENCE_CONFIG)
    recipe = VolumeRecipe(slices=12, size=48, extent=(5, 8), radius=(5.0, 8.0))
    studies = generate_studies(range(3), recipe)
    settings = TrainSettings(
        epochs=2, steps_per_epoch=2 * MIN_HISTORY + 5, clips_per_step=1, clip_length=2, train_parts="all", lr=1e-4
    )
    result = train(model, studies[:2], studies[2:], settings, CPU, None, lambda m, r: None)
    assert [e.skipped_steps for e in result.epochs] == [1, 0] and result.skipped_steps == 1
    assert result.rollbacks == 0 and all(np.isfinite(e.train_loss) for e in result.epochs)
    assert result.epochs[0].max_loss_ratio > 100
