"""One SAM2 model per process, built lazily on first use and shared by all tasks; reloaded when the
checkpoint file is replaced (a trainer publishes by atomic rename, so a reader never sees half a file).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from lib.engine.checkpoints import CheckpointError, ResolvedCheckpoint, load_model

logger = logging.getLogger(__name__)


class ModelProvider:
    """Lazily loads the model; ``get()`` returns ``(model, version)``.

    The weights come from ``published`` (what the trainer writes) when that file exists, else from the
    base ``checkpoint``; a change of either file (atomic rename) makes the next ``get()`` reload.
    """

    def __init__(
        self,
        checkpoint: ResolvedCheckpoint,
        device: torch.device,
        compute_dtype: torch.dtype | None,
        published: Path | None = None,
    ):
        self.base = checkpoint
        self.published = published
        self.device = device
        self.compute_dtype = compute_dtype
        self._model: torch.nn.Module | None = None
        self._stamp: tuple | None = None
        self._version = 0
        self._lock = threading.Lock()
        self.load_seconds = 0.0
        self.checkpoint = self.source()

    def source(self) -> ResolvedCheckpoint:
        if self.published is not None and self.published.exists():
            # fine-tuned weights are a derivative of the base weights: same licence
            return ResolvedCheckpoint(
                f"{self.base.name}+finetuned", self.base.config, self.published, licence=self.base.licence
            )
        return self.base

    def _file_stamp(self) -> tuple | None:
        stamps = []
        for path in (self.published, self.base.path):
            try:
                st = os.stat(path) if path is not None else None
            except FileNotFoundError:
                st = None
            stamps.append((st.st_mtime_ns, st.st_size) if st else None)
        return tuple(stamps)

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
                source = self.source()
                try:
                    model = load_model(source, self.device)
                except CheckpointError:
                    if self._model is None:
                        raise
                    logger.exception("New checkpoint %s failed to load; keeping the served model", source.path)
                    self._stamp = stamp
                    return self._model, self._version
                if self._model is not None:
                    logger.info("Checkpoint %s changed on disk: reloaded the model", source.path)
                self._model, self._stamp, self.checkpoint = model, stamp, source
                self._version += 1
                self.load_seconds = time.perf_counter() - t0
            return self._model, self._version
