"""Training runs of the app: the cross-replica training lock (:class:`lib.training.lease.TrainingLease`), the
check of a ``POST /train`` request before MONAI Label starts a training process, automatic retraining after N
final labels (``--conf auto_train_after``), and what ``/info`` and ``/metrics`` say about them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.async_tasks.utils import processes, tasks

from lib.errors import Refused
from lib.server.auto_train import AutoTrain
from lib.training.lease import TrainingLease

logger = logging.getLogger(__name__)

AUTO_TRAIN_MODEL = "medsam2"


@runtime_checkable
class ChecksTrainBody(Protocol):
    """A training task that checks a request body in the server (this app's trainers do, MONAI Label's do not)."""

    def check_body(self, body: Any) -> None: ...


def training_under_way() -> bool:
    """A training run of this server is submitted, queued or running."""
    return bool(processes("train")) or any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks("train"))


def last_training_start() -> float | None:
    """When this server last started a training run (MONAI Label's task list, whoever asked for it)."""
    starts = []
    for task in tasks("train"):
        try:
            starts.append(datetime.strptime(task["start_ts"], "%Y-%m-%d %H:%M:%S").timestamp())
        except (KeyError, TypeError, ValueError):
            continue
    return max(starts, default=None)


class TrainingRuns:
    """``trainers`` gives the app's training tasks (MONAI Label builds them after this object); ``start`` starts
    a run of a model in the background (MONAI Label's ``async_training``) and says whether it did."""

    def __init__(
        self,
        lock_folder: Path | None,
        replica: str,
        auto_train: AutoTrain,
        trainers: Callable[[], dict[str, TrainTask]],
        start: Callable[[str], bool],
    ):
        # the lock sits beside the published checkpoint: replicas that share it share the lock
        self.lease = TrainingLease(lock_folder, replica) if lock_folder is not None else None
        self.auto_train = auto_train
        self._trainers = trainers
        self._start = start

    def warn_if_auto_train_cannot_run(self) -> None:
        if self.auto_train.enabled and AUTO_TRAIN_MODEL not in self._trainers():
            logger.warning("--conf auto_train_after ignored: no %r trainer (training tasks are off)", AUTO_TRAIN_MODEL)

    def take_lease(self, model: str) -> str | None:
        """Take the cross-replica training lock for a run of ``model``; None when taken, else who holds it."""
        lease = self.lease
        if lease is None:
            return None
        if lease.held_here and not training_under_way():
            lease.release()  # this replica's last run ended; its watcher has not noticed yet
        holder = lease.try_acquire(model)
        if holder is not None:
            return holder.describe()
        lease.release_when_done(training_under_way)
        return None

    def check_request(self, model: str, body: Any) -> None:
        """``POST /train/{model}``: refuse (4xx) an unknown model, a body its trainer would fail on, or a run while
        another replica's runs, before a training process starts."""
        trainers = self._trainers()
        trainer = trainers.get(model)
        if trainer is None:
            raise Refused(404, f"Unknown training task {model!r}; available: {sorted(trainers)}")
        if isinstance(body, dict) and body.get("model") not in (None, model):
            raise Refused(422, f"The body names model {body['model']!r} but the URL names {model!r}.")
        if isinstance(trainer, ChecksTrainBody):
            try:
                trainer.check_body(body)
            except ValueError as e:
                raise Refused(422, f"Training not started: {str(e).rstrip('.')}.") from None
        running = self.take_lease(model)
        if running is not None:
            raise Refused(
                409,
                f"Training not started: a training run is under way ({running}). One run at a time for all "
                "replicas; wait for it to finish (GET /train/ on that replica) or stop it there.",
            )

    def label_saved(self, tag: str | None) -> dict[str, Any]:
        """``PUT /datastore/label``: with ``--conf auto_train_after N``, the N-th final label since the last training
        start starts training (not while a run is under way); what the answer says about it."""
        if not self.auto_train.enabled or AUTO_TRAIN_MODEL not in self._trainers():
            return {}
        final = tag == DefaultLabelTag.FINAL.value
        started = self.auto_train.label_saved(final, training_under_way, last_training_start, self._start_auto)
        return {"auto_train": {"started": started, "pending": self.auto_train.pending(last_training_start())}}

    def _start_auto(self) -> bool:
        if self.lease is not None and self.take_lease(AUTO_TRAIN_MODEL) is not None:
            return False  # another replica trains: its run includes this label or the next one will
        return self._start(AUTO_TRAIN_MODEL)

    def info(self, meta: dict[str, Any]) -> None:
        """``/info``: a run whose process was killed shows as INTERRUPTED; the lock's holder; auto-retraining."""
        if not training_under_way():  # a run whose process was killed (or stopped) never wrote its end
            for stats in meta.get("train_stats", {}).values():
                if isinstance(stats, dict) and stats.get("status") == "RUNNING":
                    stats["status"] = "INTERRUPTED"
        holder = self.lease.holder() if self.lease is not None else None
        meta["training_lock"] = {"held_by": holder.describe() if holder else None}
        if self.auto_train.enabled:
            meta["auto_train"] = {
                "after": self.auto_train.after,
                "final_labels_since_last_training": self.auto_train.pending(last_training_start()),
            }

    def metrics(self) -> dict[str, Any]:
        """``/metrics`` → ``training``."""
        holder = self.lease.holder() if self.lease is not None else None
        trainer = self._trainers().get(AUTO_TRAIN_MODEL)
        stats = trainer.stats() if trainer is not None else {}
        return {
            "running": 1 if holder else 0,
            "holder": holder.describe() if holder else None,
            "status": stats.get("status", ""),
            "last_dice": stats.get("best_metric"),
        }
