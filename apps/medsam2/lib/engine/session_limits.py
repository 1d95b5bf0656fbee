"""Sessions that free themselves: a cap on live annotation sessions and an idle timeout, with the background thread
that drops idle sessions and images and gives their memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from lib.errors import TooManySessions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionLimits:
    """``max_live``: annotation sessions held at once (0: no cap); ``idle_s``: a session (and an image no session
    uses) unused this long is dropped (0: never); ``reap_in_background``: a thread does it (inside the server)."""

    max_live: int = 0
    idle_s: float = 0.0
    reap_in_background: bool = False

    @property
    def reap_every_s(self) -> float:
        """How often the background thread looks: a tenth of the timeout, between 1 and 30 s."""
        return min(30.0, max(1.0, self.idle_s / 10))

    def refusal(self, oldest_idle_s: float | None) -> TooManySessions:
        """The 429 for one session more than the cap; ``oldest_idle_s``: how long the least recently used session
        has been idle (None: none known)."""
        if self.idle_s > 0 and oldest_idle_s is not None:
            retry = max(1, math.ceil(self.idle_s - oldest_idle_s))
            freed = f"the least recently used one is freed after {self.idle_s:g} s without requests, in about {retry} s"
        else:
            retry = 60
            freed = "sessions are freed only when their image leaves the cache (--conf session_idle_timeout_s is 0)"
        return TooManySessions(
            f"This server is at its cap of {self.max_live} live annotation sessions (--conf max_live_sessions): "
            f"{freed}. Retry then, close the study in a viewer you no longer use, or ask the administrator to raise "
            "the cap.",
            retry,
        )


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the operating system (glibc's ``malloc_trim``)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class Reaper:
    """A daemon thread that calls ``reap()`` every ``every_s`` seconds until :meth:`stop`."""

    def __init__(self, reap: Callable[[], int], every_s: float):
        self._reap = reap
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medsam2-session-reaper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self._reap()
            except Exception:  # keep reaping: one failure must not keep every later session alive
                logger.exception("Dropping idle sessions failed")

    def stop(self) -> None:
        self._stop.set()
