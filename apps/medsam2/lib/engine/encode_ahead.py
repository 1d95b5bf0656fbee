"""Encode an image's slices in the background while the annotator looks at it, so that a click waits for tracking
only.

One worker thread takes the images viewers open, the most recently opened first (a newer image takes over from
the one being encoded at the next chunk; that one resumes later), reads each into the segmenter's image cache and
runs the image encoder on its slices a few at a time, from the middle slice outwards. Requests come first:
while any request is being served the worker waits between chunks, so a request waits for at most the chunk in
flight. A job ends early when its image leaves the cache, when the cache (``max_session_gb``) or the machine's
memory has no room for more, or when newer images push it out of the queue. A request that arrives mid-way uses
the slices already encoded and encodes the rest itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FINISHED = ("done", "cancelled", "failed")


def available_memory() -> int | None:
    """Bytes of memory the machine can still give (None where that cannot be read)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil, or no /proc: the cache's own cap still bounds the encoder
        return None


def center_out(num_slices: int) -> list[int]:
    """Slice indices from the middle outwards (alternating sides), where key slices are usually drawn."""
    mid = (num_slices - 1) // 2
    order = [mid]
    for step in range(1, num_slices):
        order += [i for i in (mid + step, mid - step) if 0 <= i < num_slices]
    return order[:num_slices]


@dataclass
class AheadJob:
    """One opened image's background encoding."""

    name: str  # the image id the viewer opened
    source: str  # what opened it: "image download", "dicomweb", "next sample", ...
    prepare: Callable[[], Any]  # reads the image into the cache: returns its PreparedImage
    state: str = "queued"  # queued, encoding, done, cancelled, failed
    reason: str = ""
    slices: int = 0
    encoded: int = 0  # slices encoded (by this job or before it)
    by_this_job: int = 0
    submitted: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    superseded: bool = False  # a newer image was opened: yield to it at the next chunk, resume later
    prepared: Any = None  # the PreparedImage, once read

    def describe(self) -> dict[str, Any]:
        out = {"image": self.name, "source": self.source, "state": self.state, "slices": self.slices}
        out.update(encoded=self.encoded, encoded_ahead=self.by_this_job, seconds=round(self.seconds, 2))
        if self.reason:
            out["reason"] = self.reason
        return out


class EncodeAhead:
    """The background encoder: ``submit`` an opened image; requests run inside ``foreground()``.

    ``room_for(prepared, nbytes)`` answers None when ``nbytes`` more may be cached for ``prepared``, else why not.
    """

    def __init__(
        self,
        room_for: Callable[[Any, int], str | None],
        chunk: int = 2,
        max_queued: int = 4,
        keep_finished: int = 8,
    ):
        self.room_for = room_for
        self.chunk = max(1, int(chunk))
        self.max_queued = max(1, int(max_queued))
        self._queue: deque[AheadJob] = deque()
        self._finished: deque[AheadJob] = deque(maxlen=keep_finished)
        self._running: AheadJob | None = None
        self._foreground = 0
        self._cond = threading.Condition()
        self._stopping = False
        self.slices_encoded = 0
        self.waits_for_idle = 0  # times a chunk waited for requests to finish
        self._thread = threading.Thread(target=self._run, name="encode-ahead", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------------- requests

    @contextmanager
    def foreground(self) -> Iterator[None]:
        """Serve a request: the worker starts no new chunk until every request inside this has finished."""
        with self._cond:
            self._foreground += 1
        try:
            yield
        finally:
            with self._cond:
                self._foreground -= 1
                self._cond.notify_all()

    def submit(self, name: str, source: str, prepare: Callable[[], Any]) -> bool:
        """Queue an opened image (False when it is queued, encoding, or done and still cached already)."""
        with self._cond:
            if self._stopping or self._known(name):
                return False
            self._queue.append(AheadJob(name, source, prepare))
            if self._running is not None:
                self._running.superseded = True
            self._trim_queue()
            self._cond.notify_all()
            return True

    def _trim_queue(self) -> None:
        while len(self._queue) > self.max_queued:  # the viewer moved on: the oldest opened image goes
            self._finish(self._queue.popleft(), "cancelled", "newer images were opened")

    def _known(self, name: str) -> bool:
        if any(j.name == name for j in self._queue) or (self._running and self._running.name == name):
            return True
        last = next((j for j in reversed(self._finished) if j.name == name), None)
        return last is not None and last.state == "done" and not last.prepared.evicted.is_set()

    def status(self) -> dict[str, Any]:
        """For ``/info``: the job running, those queued, the last finished, and totals."""
        with self._cond:
            return {
                "running": self._running.describe() if self._running else None,
                "queued": [j.name for j in self._queue],
                "finished": [j.describe() for j in reversed(self._finished)],
                "slices_encoded": self.slices_encoded,
                "waits_for_requests": self.waits_for_idle,
                "requests_running": self._foreground,
            }

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ----------------------------------------------------------------------------------------------- worker

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._running = self._queue.pop()  # the most recently opened image first
                job.state = "encoding"
            started = time.monotonic()
            try:
                self._encode(job)
            except Exception as e:  # a bad image: the request that reads it answers with the reason
                job.state, job.reason = "failed", " ".join(str(e).split())[:300] or type(e).__name__
                logger.info("Encode-ahead of %s stopped: %s", job.name, job.reason)
            job.seconds += time.monotonic() - started
            with self._cond:
                self._running = None
                if job.state == "superseded":  # after the newer images, unless they push it out
                    job.state, job.superseded = "queued", False
                    self._queue.appendleft(job)
                    self._trim_queue()
                else:
                    self._finish(job, job.state if job.state in FINISHED else "done", job.reason)

    def _finish(self, job: AheadJob, state: str, reason: str = "") -> None:
        job.state, job.reason = state, reason
        self._finished.append(job)

    def _wait_for_idle(self) -> bool:
        """Wait while requests run; False when the worker is stopping."""
        with self._cond:
            if self._foreground:
                self.waits_for_idle += 1
            while self._foreground and not self._stopping:
                self._cond.wait()
            return not self._stopping

    def _encode(self, job: AheadJob) -> None:
        if not self._wait_for_idle():
            return
        if job.prepared is None:
            job.prepared = job.prepare()
        prepared = job.prepared
        volume = prepared.volume
        job.slices = volume.num_slices
        todo = [i for i in center_out(volume.num_slices) if not volume.is_encoded(i)]
        for start in range(0, len(todo), self.chunk):
            if not self._wait_for_idle():
                job.state, job.reason = "cancelled", "the server is stopping"
                return
            if job.superseded:
                job.state = "superseded"
                return
            reason = self._why_stop(prepared, volume)
            if reason:
                job.state, job.reason = "cancelled", reason
                return
            chunk = todo[start : start + self.chunk]
            with volume.lock:  # a request on this image waits for this chunk at most
                before = volume.slices_encoded
                volume.encode(chunk)
                new = volume.slices_encoded - before
            volume.slices_encoded_ahead += new
            job.by_this_job += new
            self.slices_encoded += new
            job.encoded = volume.encoded_count()
            prepared.grew()
        job.encoded = volume.encoded_count()

    def _why_stop(self, prepared: Any, volume: Any) -> str | None:
        if prepared.evicted.is_set():
            return "the image left the session cache"
        return self.room_for(prepared, self.chunk * volume.bytes_per_slice())
