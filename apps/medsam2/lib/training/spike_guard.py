"""The spike guard: an optimiser step whose loss explodes against the running median of the steps before it is
skipped (its gradients are dropped), and when several steps in a row are skipped the run has probably diverged
already, so the trained weights and the optimiser state are rolled back to the last snapshot and the learning rate
is halved. Counted per epoch and per run (EpochReport, train_stats). No MONAI Label imports.

It judges the loss, not the gradient norm: in our runs from random init the gradient norm of ordinary steps
ranged over 50x its running median while the model was learning (and the gradient clip bounds the step anyway),
whereas a diverging run shows as a loss that stays several times above its median (1.36 -> 14.96 on the H200).
Only a non-finite gradient norm counts as a spike.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

SPIKE_WINDOW = 50  # accepted steps the running medians are taken over
MIN_HISTORY = 10  # accepted steps before the guard judges a step (a run's first steps change fast)
MAX_SKIPS_IN_A_ROW = 3  # then roll back to the last snapshot and halve the learning rate
SNAPSHOT_EVERY = 25  # accepted steps between snapshots of the trained weights and the optimiser state


@dataclass
class _Snapshot:
    params: list[torch.Tensor]
    optimizer: dict


@dataclass
class SpikeGuard:
    """Judges each step against the running median of the last :data:`SPIKE_WINDOW` accepted steps' losses: a step
    whose loss exceeds ``factor`` times it, or whose loss or gradient norm is not finite, is a spike (``factor`` 0:
    only non-finite steps are)."""

    factor: float
    losses: deque = field(default_factory=lambda: deque(maxlen=SPIKE_WINDOW))
    skipped: int = 0
    rollbacks: int = 0
    in_a_row: int = 0
    accepted: int = 0
    max_loss_ratio: float = 0.0  # the largest loss / running median seen since the last reset_epoch
    last_spike: str = ""
    snapshot: _Snapshot | None = None

    def spike(self, loss: float, norm: float) -> str:
        """Why this step is a spike ("" when it is not)."""
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return f"loss {loss:.4g}, gradient norm {norm:.4g}: not finite"
        if len(self.losses) < MIN_HISTORY:
            return ""
        median = float(np.median(self.losses))
        self.max_loss_ratio = max(self.max_loss_ratio, loss / max(median, 1e-12))
        if self.factor > 0 and loss > self.factor * median:
            return f"loss {loss:.4g} > {self.factor:g} x the running median {median:.4g}"
        return ""

    def accept(self, loss: float, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Record an applied step; snapshot the weights and optimiser state every :data:`SNAPSHOT_EVERY` steps."""
        self.losses.append(loss)
        self.in_a_row = 0
        self.accepted += 1
        if self.factor > 0 and self.accepted % SNAPSHOT_EVERY == 1:
            self.snapshot = _Snapshot([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()))

    def reject(self, reason: str) -> bool:
        """Count a skipped step; True when it is the :data:`MAX_SKIPS_IN_A_ROW`-th in a row (time to roll back)."""
        self.skipped += 1
        self.in_a_row += 1
        self.last_spike = reason
        return self.factor > 0 and self.in_a_row >= MAX_SKIPS_IN_A_ROW and self.snapshot is not None

    def roll_back(
        self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR
    ) -> None:
        """Restore the last snapshot and halve the learning rate (the peak and what remains of the schedule)."""
        assert self.snapshot is not None
        with torch.no_grad():
            for p, saved in zip(params, self.snapshot.params, strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(copy.deepcopy(self.snapshot.optimizer))  # a copy: the optimiser updates in place
        schedule.base_lrs = [lr / 2 for lr in schedule.base_lrs]
        for group, lr in zip(optimizer.param_groups, schedule.get_last_lr(), strict=True):
            group["lr"] = lr / 2
        self.rollbacks += 1
        self.in_a_row = 0

    def reset_epoch(self) -> tuple[int, int, float]:
        """(skipped, rolled back, largest loss ratio) since the last call, and start counting again."""
        counts = (self.skipped, self.rollbacks, self.max_loss_ratio)
        self.skipped = self.rollbacks = 0
        self.max_loss_ratio = 0.0
        return counts
