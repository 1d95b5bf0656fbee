"""The models the app serves: one :class:`ModelConfig` per module of ``lib/configs`` (the module's name is the
model's, as in MONAI Label's sample apps), found and initialised once at start, then loaded and warmed up in the
background. What ``/info``, ``/metrics``, ``/health/ready`` and encode-ahead need of them is read here."""

from __future__ import annotations

import importlib
import logging
import threading
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.class_utils import get_class_names

from lib.engine.checkpoints import remove_unfinished_checkpoint_writes
from lib.settings import AppSettings

if TYPE_CHECKING:
    from lib.engine.checkpoints import ResolvedCheckpoint
    from lib.engine.model_provider import ModelProvider
    from lib.engine.segmenter import MedSAM2Segmenter

logger = logging.getLogger(__name__)


class ModelConfig(TaskConfig):
    """What the app reads of a model config besides MONAI Label's ``TaskConfig`` (set by its ``init``): every model
    of this app has its inference tasks by name, a trainer and its active-learning strategies by name."""

    labels: dict[str, int]
    path: str | None  # the checkpoint file (None: random weights)
    checkpoint: ResolvedCheckpoint
    provider: ModelProvider
    segmenter: MedSAM2Segmenter

    @abstractmethod
    def infer(self) -> dict[str, InferTask]: ...

    @abstractmethod
    def trainer(self) -> TrainTask: ...

    @abstractmethod
    def strategy(self) -> dict[str, Strategy]: ...


def discover_models(package: ModuleType, model_dir: str, conf: dict[str, str], settings: AppSettings):
    """The configs of ``package`` (``lib.configs``) that ``--conf models`` names, initialised, by model name."""
    found = {path.split(".")[-2].lower(): path for path in get_class_names(package, ModelConfig.__name__)}
    models: dict[str, ModelConfig] = {}
    for name, path in sorted(found.items()):
        if name not in settings.models:
            continue
        module_name, class_name = path.rsplit(".", 1)
        config = getattr(importlib.import_module(module_name), class_name)()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"{path} must subclass lib.server.served_models.ModelConfig")
        config.init(name, model_dir, conf, None, settings=settings)
        models[name] = config
    return models


class ServedModels:
    """The app's models by name: loaded at start in the background, then warmed up (``--conf warm_up``)."""

    def __init__(self, models: dict[str, ModelConfig], warm_up: bool):
        self.models = models
        self._warm_up = warm_up
        self.load_errors: dict[str, str] = {}
        self.warm_up: dict[str, float | str | None] = {}  # per model: seconds the warm-up took, or why it failed

    def items(self):
        return self.models.items()

    def remove_unfinished_writes(self) -> None:
        """Temporary files of a publish or a download that was killed."""
        for config in self.models.values():
            for path in (config.provider.published, config.provider.base.path, config.provider.adapter):
                remove_unfinished_checkpoint_writes(path)

    def published_folder(self) -> Path | None:
        """The folder of the first model's published checkpoint (where the training lock lives)."""
        published = [c.provider.published for c in self.models.values() if c.provider.published is not None]
        return published[0].parent if published else None

    def start_loading(self) -> None:
        """Load (and warm up) every model in a background thread: not in the first user's request."""
        threading.Thread(target=self._load_all, daemon=True, name="warm-models").start()

    def _load_all(self) -> None:
        for name, config in self.models.items():
            try:
                config.provider.get()
                logger.info("Model %s loaded at start (%.1f s)", name, config.provider.load_seconds)
            except Exception as e:  # reported by /health/ready; a request retries the load
                self.load_errors[name] = f"{type(e).__name__}: {e}"
                logger.error("Model %s could not be loaded at start: %s", name, e)
                continue
            if self._warm_up:
                self._warm(name, config)

    def _warm(self, name: str, config: ModelConfig) -> None:
        try:  # kernels set up (and CUDA graphs captured) now, not in the first user's request
            self.warm_up[name] = round(config.segmenter.warm_up(), 2)
            logger.info("Model %s warmed up (%.1f s)", name, self.warm_up[name] or 0.0)
        except Exception as e:  # only a first request that is slower: never a reason to stop serving
            self.warm_up[name] = f"failed: {type(e).__name__}: {e}"
            logger.warning("Model %s warm-up failed: %s", name, e)

    def not_loaded(self) -> list[str]:
        """Why a model cannot answer yet (``/health/ready``): still loading, or failed to."""
        return [
            f"model {name!r} "
            + (f"failed to load: {self.load_errors[name]}" if name in self.load_errors else "is loading")
            for name, config in self.models.items()
            if not config.provider.loaded
        ]

    def label_names(self) -> dict[str, int]:
        """Every model's label names and values (the first model to name a label wins)."""
        names: dict[str, int] = {}
        for config in self.models.values():
            names.update({k: v for k, v in config.labels.items() if k not in names})
        return names

    def open_ahead(self, image_id: str, source: str, image_path: Callable[[], str]) -> None:
        """A viewer opened this image: every model encodes it in the background (:mod:`lib.engine.encode_ahead`)."""
        for config in self.models.values():
            config.segmenter.open_ahead(image_id, source, image_path)

    def heartbeat(self, image_id: str, session_name: str | None) -> int:
        """A viewer still has this image open: every model keeps its sessions on it (429 at the session cap)."""
        return sum(config.segmenter.heartbeat(image_id, session_name) for config in self.models.values())

    def checkpoints(self) -> dict[str, dict[str, Any]]:
        """``/info`` → ``checkpoints``: what each model serves."""
        return {
            name: {
                "name": c.checkpoint.name,
                "random_weights": c.checkpoint.is_random,
                "path": c.path,
                "serving": c.provider.source().name,
                "licence": c.provider.source().licence,
                "adapter": c.provider.adapter_info(),  # None, or its name, file size and whether it is merged
                "engine": dict(c.provider.engine_paths),  # SAM2's modules or the CPU forms (cpu_tracking, ...)
            }
            for name, c in self.models.items()
        }

    def session_caches(self) -> dict[str, dict[str, Any]]:
        return {name: c.segmenter.cache.stats() for name, c in self.models.items()}

    def encode_ahead(self) -> dict[str, dict[str, Any] | None]:
        return {n: c.segmenter.ahead.status() if c.segmenter.ahead is not None else None for n, c in self.items()}

    def checkpoint_metrics(self) -> dict[str, dict[str, Any]]:
        """``/metrics``: each model's checkpoint name, licence and version."""
        return {
            n: {
                "name": c.provider.checkpoint.name,
                "licence": c.provider.checkpoint.licence,
                "version": c.provider.version,
            }
            for n, c in self.models.items()
        }
