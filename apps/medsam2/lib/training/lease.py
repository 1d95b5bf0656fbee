"""One training run at a time across every server process that shares a model folder (replicas).

A run holds an exclusive ``flock`` on ``training.lock`` in the shared model folder and writes who it is into
that file. The kernel drops the lock when the holder dies (SIGKILL included), so a crashed replica never
blocks training for good. A second replica asked to train finds the lock taken and reads who holds it.

No MONAI Label imports: the server (``lib/server/training_runs.py``) and the training process use it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LEASE_FILE = "training.lock"


@dataclass(frozen=True)
class LeaseHolder:
    """Who runs the training that holds the lease."""

    replica: str
    model: str
    pid: int
    since: str

    def describe(self) -> str:
        return f"model {self.model!r} on replica {self.replica!r} (process {self.pid}, since {self.since})"


def default_replica_name(port: int | str | None = None) -> str:
    """``host:port`` of this server process (``--conf replica_name`` overrides it)."""
    return f"{socket.gethostname()}:{port if port is not None else os.getpid()}"


class TrainingLease:
    """The cross-process training lock in ``folder``; :meth:`try_acquire` takes it or says who holds it."""

    def __init__(self, folder: Path, replica: str):
        self.path = Path(folder) / LEASE_FILE
        self.replica = replica
        self._fd: int | None = None
        self._guard = threading.Lock()
        self._generation = 0  # one per acquisition: a watcher of an earlier run never releases a later one

    @property
    def held_here(self) -> bool:
        return self._fd is not None

    def try_acquire(self, model: str) -> LeaseHolder | None:
        """Take the lease for a run of ``model``: None when taken, else the current holder (the caller answers 409)."""
        with self._guard:
            if self._fd is not None:
                return self.holder() or LeaseHolder(self.replica, model, os.getpid(), "now")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return self.holder() or LeaseHolder("unknown", "unknown", 0, "unknown")
            me = LeaseHolder(self.replica, model, os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
            self._fd = fd
            self._generation += 1
            logger.info("Training lease taken: %s", me.describe())
            return None

    def release(self, generation: int | None = None) -> None:
        """Give the lease back (the holder's file content stays until the next run overwrites it); with
        ``generation``, only if no later acquisition took it since."""
        with self._guard:
            if self._fd is None or generation not in (None, self._generation):
                return
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            logger.info("Training lease released by %s", self.replica)

    def holder(self) -> LeaseHolder | None:
        """Who holds the lease now (any process), or None when nobody does."""
        if self._fd is None and not self._locked_elsewhere():
            return None
        try:
            return LeaseHolder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _locked_elsewhere(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's shared lock
        return False

    def release_when_done(self, under_way: Callable[[], bool], start_grace_s: float = 30.0, every_s: float = 1.0):
        """Release the lease once ``under_way()`` has been True and turns False, or if it never turns True
        within ``start_grace_s`` (the run did not start). Runs in a daemon thread."""

        generation = self._generation

        def watch() -> None:
            started, t0 = False, time.monotonic()
            while self.held_here and generation == self._generation:
                running = under_way()
                started = started or running
                if (started and not running) or (not started and time.monotonic() - t0 > start_grace_s):
                    self.release(generation)
                    return
                time.sleep(every_s)

        threading.Thread(target=watch, daemon=True, name="training-lease").start()


def exit_when_orphaned(every_s: float = 2.0) -> None:
    """In a training process started by a server: stop it when that server dies (its lease is gone with it, so
    another replica may start training, and two runs must not publish over each other)."""
    parent = os.getppid()
    if parent <= 1:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        logger.error("The server that started this training run (process %d) is gone: stopping the run.", parent)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="orphan-watch").start()
