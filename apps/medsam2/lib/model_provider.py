"""One SAM2 model per process, built lazily on first use and shared by all tasks; reloaded when the
checkpoint file is replaced (a trainer publishes by atomic rename, so a reader never sees half a file).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from .checkpoints import CheckpointError, ResolvedCheckpoint, load_model

logger = logging.getLogger(__name__)


def pick_device(spec: str | None) -> torch.device:
    """``auto`` (default): CUDA when available, else CPU."""
    if not spec or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


class ModelProvider:
    """Lazily loads the model for a checkpoint; ``get()`` returns ``(model, version)``."""

    def __init__(self, checkpoint: ResolvedCheckpoint, device: torch.device, compute_dtype: torch.dtype | None):
        self.checkpoint = checkpoint
        self.device = device
        self.compute_dtype = compute_dtype
        self._model: torch.nn.Module | None = None
        self._stamp: tuple[float, int] | None = None
        self._version = 0
        self._lock = threading.Lock()
        self.load_seconds = 0.0

    def _file_stamp(self) -> tuple[float, int] | None:
        path = self.checkpoint.path
        if path is None:
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_mtime, st.st_size)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def version(self) -> int:
        return self._version

    def get(self) -> tuple[torch.nn.Module, int]:
        """The current model; (re)loads it if never loaded or if its checkpoint file changed."""
        stamp = self._file_stamp()
        if self._model is not None and stamp == self._stamp:
            return self._model, self._version
        with self._lock:
            stamp = self._file_stamp()
            if self._model is None or stamp != self._stamp:
                t0 = time.perf_counter()
                try:
                    model = load_model(self.checkpoint, self.device)
                except CheckpointError:
                    if self._model is None:
                        raise
                    logger.exception("New checkpoint %s failed to load; keeping the served model", self.checkpoint.path)
                    self._stamp = stamp
                    return self._model, self._version
                if self._model is not None:
                    logger.info("Checkpoint %s changed on disk: reloaded the model", self.checkpoint.path)
                self._model, self._stamp = model, stamp
                self._version += 1
                self.load_seconds = time.perf_counter() - t0
            return self._model, self._version
