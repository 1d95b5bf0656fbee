"""Training steps prepared ahead in a background thread (clip sampling, the batch layout, target masks,
simulated prompts), so that the training loop only runs the model. The thread draws from its own random
generator, in order, so a run stays reproducible whatever the timing."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class StepPrefetcher(Generic[Item]):
    """Calls ``make`` in a background thread and keeps up to ``depth`` results ready; an exception raised by
    ``make`` is raised by the :meth:`next` that would have returned its result."""

    def __init__(self, make: Callable[[], Item], depth: int = 2):
        self._make = make
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="training-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item: object = ("ok", self._make())
            except BaseException as e:  # handed to the training loop, which raises it
                item = ("error", e)
            while not self._stop.is_set():
                try:
                    self._ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":  # type: ignore[index]
                return

    def next(self) -> Item:
        kind, value = self._ready.get()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop preparing; returns once the thread has ended."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> StepPrefetcher[Item]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
