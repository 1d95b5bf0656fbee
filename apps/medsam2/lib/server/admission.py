"""Admission control for inference: a bounded number of requests run, a bounded number wait (first come,
first served, for at most ``queue_timeout_s``), and the rest are refused at once with a retry hint.

Plain Python (no MONAI Label): the app turns :class:`ServerBusy` into HTTP 503 with a ``Retry-After`` header.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lib.errors import ServerBusy
from lib.settings import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED, DEFAULT_QUEUE_TIMEOUT_S, AppSettings


@dataclass(frozen=True)
class AdmissionSettings:
    """``--conf max_concurrent_infers``, ``max_queued_infers`` and ``queue_timeout_s``."""

    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_queued: int = DEFAULT_MAX_QUEUED
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S

    def __post_init__(self):
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent_infers must be at least 1, got {self.max_concurrent}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued_infers must be 0 (no queue) or more, got {self.max_queued}")
        if not (self.queue_timeout_s > 0 and math.isfinite(self.queue_timeout_s)):
            raise ValueError(f"queue_timeout_s must be a positive number of seconds, got {self.queue_timeout_s}")

    @classmethod
    def from_settings(cls, settings: AppSettings) -> AdmissionSettings:
        """The gate's limits from the app's parsed ``--conf`` (:mod:`lib.settings` checks and defaults them)."""
        return cls(settings.max_concurrent_infers, settings.max_queued_infers, settings.queue_timeout_s)


class AdmissionGate:
    """At most ``max_concurrent`` holders at once; up to ``max_queued`` more wait in arrival order.

    ``Retry-After`` is estimated from the mean duration of recent requests and the work ahead of a caller.
    """

    def __init__(self, settings: AdmissionSettings | None = None, clock=time.monotonic):
        self.settings = settings or AdmissionSettings()
        self._clock = clock
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: deque[object] = deque()  # tickets, oldest first
        self._mean_service_s: float | None = None
        self.admitted = 0
        self.refused_queue_full = 0
        self.refused_timeout = 0
        self.peak_running = 0
        self.peak_queued = 0

    def retry_after_s(self) -> int:
        """Seconds until a retry would likely find room: the queue ahead drained at the observed pace."""
        with self._cond:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        mean = self._mean_service_s if self._mean_service_s is not None else 1.0
        ahead = self._running + len(self._waiting)
        return max(1, math.ceil(mean * ahead / self.settings.max_concurrent))

    @contextmanager
    def admit(self) -> Iterator[float]:
        """Hold one slot for the duration of the block; yields the seconds spent waiting for it.

        Raises :class:`ServerBusy` at once when the queue is full, or after ``queue_timeout_s`` in the queue.
        """
        s = self.settings
        t0 = self._clock()
        with self._cond:
            if self._running >= s.max_concurrent or self._waiting:
                if len(self._waiting) >= s.max_queued:
                    self.refused_queue_full += 1
                    raise ServerBusy(
                        f"The server is busy: {self._running} inference request(s) running and "
                        f"{len(self._waiting)} waiting (limits: --conf max_concurrent_infers {s.max_concurrent}, "
                        f"max_queued_infers {s.max_queued}). Retry later.",
                        self._retry_after_locked(),
                    )
                ticket = object()
                self._waiting.append(ticket)
                self.peak_queued = max(self.peak_queued, len(self._waiting))
                deadline = t0 + s.queue_timeout_s
                while not (self._waiting[0] is ticket and self._running < s.max_concurrent):
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        self._waiting.remove(ticket)
                        self.refused_timeout += 1
                        self._cond.notify_all()  # the next in line may now be first
                        raise ServerBusy(
                            f"The server is busy: this request waited {s.queue_timeout_s:g} s "
                            f"(--conf queue_timeout_s) without a free slot "
                            f"(--conf max_concurrent_infers {s.max_concurrent}). Retry later.",
                            self._retry_after_locked(),
                        )
                    self._cond.wait(remaining)
                self._waiting.popleft()
            self._running += 1
            self.admitted += 1
            self.peak_running = max(self.peak_running, self._running)
            self._cond.notify_all()  # a second free slot lets the next waiter in too
        started = self._clock()
        try:
            yield started - t0
        finally:
            took = self._clock() - started
            with self._cond:
                self._running -= 1
                self._mean_service_s = took if self._mean_service_s is None else 0.8 * self._mean_service_s + 0.2 * took
                self._cond.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """Limits, current load and counters (for ``/info``)."""
        with self._cond:
            return {
                "max_concurrent_infers": self.settings.max_concurrent,
                "max_queued_infers": self.settings.max_queued,
                "queue_timeout_s": self.settings.queue_timeout_s,
                "running": self._running,
                "queued": len(self._waiting),
                "admitted": self.admitted,
                "refused_queue_full": self.refused_queue_full,
                "refused_timeout": self.refused_timeout,
                "peak_running": self.peak_running,
                "peak_queued": self.peak_queued,
                "mean_service_s": None if self._mean_service_s is None else round(self._mean_service_s, 4),
            }
