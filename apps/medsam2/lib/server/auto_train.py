"""When the app starts fine-tuning by itself (``--conf auto_train_after N``): after N final labels have been
saved since the last training start, unless a training run is under way. No MONAI Label imports: the app
passes in how to tell whether training runs, when it last started, and how to start it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class AutoTrain:
    """Counts final labels saved since the last training start and starts training at ``after`` of them.

    ``after`` 0 turns it off. A training start that this object did not make (e.g. ``POST /train``) also
    restarts the count, through ``last_start``. Saves while a run is under way count towards the next run,
    which the first final label saved after the run ends can start.
    """

    def __init__(self, after: int, clock: Callable[[], float] = time.time):
        if after < 0:
            raise ValueError(f"auto_train_after must be >= 0, got {after}")
        self.after = after
        self._clock = clock
        self._saves: list[float] = []
        self._last_start = float("-inf")
        self._lock = threading.RLock()  # start() may ask for pending() (e.g. through the app's info)

    @property
    def enabled(self) -> bool:
        return self.after > 0

    def pending(self, last_start: float | None = None) -> int:
        """Final labels saved since the last training start."""
        with self._lock:
            return self._count(last_start)

    def _count(self, last_start: float | None) -> int:
        if last_start is not None and last_start > self._last_start:
            self._last_start = last_start
        self._saves = [t for t in self._saves if t > self._last_start]
        return len(self._saves)

    def label_saved(
        self,
        final: bool,
        running: Callable[[], bool],
        last_start: Callable[[], float | None],
        start: Callable[[], bool],
    ) -> bool:
        """Record a saved label (``final``: saved with the final tag); start training when due.

        ``running()``: a training run is submitted or under way; ``last_start()``: when the latest training run
        started (epoch seconds, None if never); ``start()``: start one, True when it did. Returns whether this
        call started a run. Concurrent saves are serialised, so two saves cannot start two runs.
        """
        if not self.enabled:
            return False
        with self._lock:
            now = self._clock()
            if final:
                self._saves.append(now)
            count = self._count(last_start())
            if count < self.after:
                return False
            if running():
                logger.info("auto-train: %d new final labels, but a training run is under way", count)
                return False
            logger.info("auto-train: %d new final labels since the last training start: starting training", count)
            if not start():
                return False
            self._last_start = now
            self._saves.clear()
            return True
