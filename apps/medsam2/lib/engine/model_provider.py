"""One SAM2 model per process, built lazily on first use and shared by all tasks; reloaded when the
checkpoint file (or the served adapter's file) is replaced (a trainer publishes by atomic rename, so a reader never
sees half a file).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lib.engine.checkpoints import CheckpointError, ResolvedCheckpoint, load_model
from lib.engine.cpu_inference import use_cpu_inference_modules
from lib.engine.openvino_encoder import use_openvino_image_encoder

logger = logging.getLogger(__name__)


class ModelProvider:
    """Lazily loads the model; ``get()`` returns ``(model, version)``.

    The weights come from ``published`` (what the trainer writes) when that file exists, else from the
    base ``checkpoint``; with ``adapter`` (a LoRA adapter file, :mod:`lib.engine.adapters`), that adapter is merged
    into them while its file exists. A change of any of these files (atomic rename) makes the next ``get()`` reload.
    """

    def __init__(
        self,
        checkpoint: ResolvedCheckpoint,
        device: torch.device,
        compute_dtype: torch.dtype | None,
        published: Path | None = None,
        adapter: Path | None = None,
        cpu_tracking: str = "fast",
        cpu_encoder: str = "openvino",
    ):
        self.base = checkpoint
        self.cpu_tracking = cpu_tracking  # "fast": lib.engine.cpu_inference's modules on a CPU
        self.cpu_encoder = cpu_encoder  # "openvino": lib.engine.openvino_encoder on a CPU with bf16
        self.engine_paths: dict[str, str] = {}  # what the served model runs (for /info)
        self.published = published
        self.adapter = adapter
        self.adapter_loaded: dict[str, Any] | None = None  # the adapter merged into the served model
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
        for path in (self.published, self.base.path, self.adapter):
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
                    model, adapter = self._load(source)
                    self.engine_paths = self._use_cpu_paths(model)
                except CheckpointError:
                    if self._model is None:
                        raise
                    logger.exception("New checkpoint %s failed to load; keeping the served model", source.path)
                    self._stamp = stamp
                    return self._model, self._version
                if self._model is not None:
                    logger.info("Checkpoint %s changed on disk: reloaded the model", source.path)
                self._model, self._stamp, self.checkpoint = model, stamp, source
                self.adapter_loaded = adapter
                self._version += 1
                self.load_seconds = time.perf_counter() - t0
            return self._model, self._version

    def _use_cpu_paths(self, model: torch.nn.Module) -> dict[str, str]:
        """On a CPU, the faster forms of the tracking modules and of the image encoder (``bench/cpu_paths.py``)."""
        paths = {"tracking": "sam2", "image_encoder": "sam2"}
        if self.device.type != "cpu":
            return paths
        if self.cpu_tracking == "fast":
            use_cpu_inference_modules(model)
            paths["tracking"] = "cpu_inference"
        # OpenVINO's CPU plugin runs bf16 where the CPU has it, so only where the app would run bf16 anyway
        if self.cpu_encoder == "openvino" and self.compute_dtype == torch.bfloat16:
            if use_openvino_image_encoder(model) is not None:
                paths["image_encoder"] = "openvino"
        return paths

    def _load(self, source: ResolvedCheckpoint) -> tuple[torch.nn.Module, dict[str, Any] | None]:
        """The weights of ``source`` and, when the adapter file exists, that adapter merged into them (strictly:
        it must have been trained on these weights); also what is known of the adapter (None: none merged)."""
        if self.adapter is None or not self.adapter.exists():
            return load_model(source, self.device), None
        from lib.engine.adapters import load_adapter, merge_adapter

        size = os.stat(self.adapter).st_size
        model = load_model(source, "cpu")
        payload = load_adapter(model, self.adapter, source.name)
        merge_adapter(model)
        logger.info("Adapter %s (%d bytes) merged into %s", self.adapter, size, source.name)
        adapter = {"name": self.adapter.stem, "bytes": size, "rank": payload["lora"].get("rank")}
        adapter.update({k: payload[k] for k in ("epoch", "val_dice") if k in payload})
        return model.to(self.device).eval(), adapter

    def adapter_info(self) -> dict[str, Any] | None:
        """For ``/info``: the adapter asked for (None: none), its file's size now, and whether it is merged into
        the served model (with that file's rank, epoch, val_dice and size)."""
        if self.adapter is None:
            return None
        try:
            size: int | None = os.stat(self.adapter).st_size
        except FileNotFoundError:
            size = None
        return {"name": self.adapter.stem, "file_bytes": size, "loaded": self.adapter_loaded}
