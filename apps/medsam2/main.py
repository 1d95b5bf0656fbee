"""MONAI Label app serving SAM2-family models (MedSAM2 or stock SAM2.1): 2D box prompting and 3D propagation."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import monailabel
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.class_utils import get_class_names

import lib.configs
from lib.checkpoints import CheckpointError
from lib.cine_io import VIDEO_SUFFIXES, is_multiframe_dicom
from lib.prompts import PromptError

logger = logging.getLogger(__name__)


def _is_upload(path: str) -> bool:
    """MONAI Label stores an uploaded image as a temporary file and passes its path as the image id."""
    return os.path.realpath(path).startswith(os.path.realpath(tempfile.gettempdir()) + os.sep)


def _install_error_handlers() -> None:
    """MONAI Label parses ``params`` with json.loads and answers 500 on bad JSON; answer 400 instead."""
    try:
        from monailabel.app import app as server
    except Exception:  # not running inside the server (e.g. a training subprocess)
        return

    async def bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": f"'params' is not valid JSON: {exc.msg}."})

    if json.JSONDecodeError not in server.exception_handlers:
        server.add_exception_handler(json.JSONDecodeError, bad_json)
        server.middleware_stack = None  # rebuilt with the handler on the next request


CINE_PATTERNS = [f"*{suffix}" for suffix in (".dcm", *VIDEO_SUFFIXES)]


class CineLocalDatastore(LocalDatastore):
    """MONAI Label's local datastore, also listing cine loops: multi-frame DICOM files and video files.

    Single-frame ``.dcm`` files (e.g. the slices of a series) stay unlisted, as before.
    """

    def _list_files(self, path: str, patterns: list[str]) -> dict[str, str]:
        files = super()._list_files(path, patterns)
        return {
            name: file
            for name, file in files.items()
            if not name.lower().endswith(".dcm") or is_multiframe_dicom(os.path.join(path, file))
        }


class MedSAM2App(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.model_dir = os.path.join(app_dir, "model")
        configs = {c.split(".")[-2].lower(): c for c in get_class_names(lib.configs, "TaskConfig")}
        wanted = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        unknown = [m for m in wanted if m != "all" and m not in configs]
        if unknown:
            raise SystemExit(f"Unknown --conf models {unknown}; available: all, {', '.join(sorted(configs))}")
        self.models: dict[str, TaskConfig] = {}
        for name, cls_path in sorted(configs.items()):
            if "all" in wanted or name in wanted:
                module_name, cls_name = cls_path.rsplit(".", 1)
                module = __import__(module_name, fromlist=[cls_name])
                task_config: TaskConfig = getattr(module, cls_name)()
                task_config.init(name, self.model_dir, conf, None)
                self.models[name] = task_config
        _install_error_handlers()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedSAM2",
            description="Promptable 3D medical image segmentation with SAM2-family models (MedSAM2, SAM2.1)",
            version=monailabel.__version__,
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        patterns = [*settings.MONAI_LABEL_DATASTORE_FILE_EXT]
        patterns += [p for pattern in CINE_PATTERNS for p in (pattern, pattern.upper()) if p not in patterns]
        return CineLocalDatastore(
            self.studies,
            extensions=patterns,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, task_config in self.models.items():
            tasks = task_config.infer()
            infers.update(tasks if isinstance(tasks, dict) else {name: tasks})
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        for name, task_config in self.models.items():
            trainer = task_config.trainer()
            if trainer:
                trainers[name] = trainer
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        for name, task_config in self.models.items():
            extra = task_config.strategy()
            strategies.update(extra if isinstance(extra, dict) else {name: extra} if extra else {})
        return strategies

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["checkpoints"] = {
            name: {
                "name": c.checkpoint.name,
                "random_weights": c.checkpoint.is_random,
                "path": c.path,
                "serving": c.provider.source().name,
            }
            for name, c in self.models.items()
            if hasattr(c, "checkpoint")
        }
        if any(v["random_weights"] for v in meta["checkpoints"].values()):
            meta["warning"] = "RANDOM WEIGHTS: started with --conf checkpoint random; masks are meaningless."
        return meta

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=400, detail="No image given: pass ?image=<image id> or upload a file.")
        if os.path.exists(image) and not _is_upload(image):
            raise HTTPException(status_code=400, detail="Image ids name datastore images, not server file paths.")
        if request.get("model") not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"Unknown model {request.get('model')!r}; available: {sorted(self._infers)}"
            )
        try:
            return super().infer(request, datastore)
        except PromptError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from None
        except CheckpointError as e:
            raise HTTPException(status_code=503, detail=f"The model could not be loaded: {e}") from None
        except MemoryError:
            raise HTTPException(status_code=503, detail="The server ran out of memory; retry later.") from None
