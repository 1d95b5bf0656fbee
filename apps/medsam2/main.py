"""MONAI Label app serving SAM2-family models (MedSAM2 or stock SAM2.1): 2D box prompting and 3D propagation."""

from __future__ import annotations

import logging
import os
import sys
import threading
from datetime import datetime
from typing import Any

import monailabel
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.async_tasks.utils import processes, tasks
from monailabel.utils.others.class_utils import get_class_names

import lib.configs
from lib.engine.checkpoints import CheckpointError, remove_unfinished_checkpoint_writes
from lib.errors import BadRequest, NotFound, Refused
from lib.server.admission import AdmissionGate, AdmissionSettings
from lib.server.auto_train import AutoTrain
from lib.server.operations import OperationsSource
from lib.server.patches import PatchContext, install_all
from lib.server.saved_label_tag import tag_being_saved
from lib.server.server_process import in_server
from lib.settings import SettingError, parse_settings
from lib.storage.label_sources import attach_label_file, is_upload
from lib.storage.local_datastore import CINE_PATTERNS, CineLocalDatastore
from lib.storage.pacs_datastore import PacsDatastore, TimeoutSession, pacs_credentials
from lib.training.lease import TrainingLease, default_replica_name

logger = logging.getLogger(__name__)


AUTO_TRAIN_MODEL = "medsam2"


def _training_under_way() -> bool:
    """A training run of this server is submitted, queued or running."""
    return bool(processes("train")) or any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks("train"))


def _last_training_start() -> float | None:
    """When this server last started a training run (MONAI Label's task list, whoever asked for it)."""
    starts = []
    for task in tasks("train"):
        try:
            starts.append(datetime.strptime(task["start_ts"], "%Y-%m-%d %H:%M:%S").timestamp())
        except (KeyError, TypeError, ValueError):
            continue
    return max(starts, default=None)


class MedSAM2App(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        try:
            self._setup(app_dir, studies, conf)
        except (SystemExit, CheckpointError, SettingError) as e:
            if not in_server():  # e.g. a training process: its caller reports the failure
                raise
            # inside uvicorn's startup an exception is printed as a long traceback around the one line that
            # matters; an administrator gets that line alone, and the exit status 2
            message = str(e.code if isinstance(e, SystemExit) else e)
            logger.critical("The MedSAM2 app cannot start: %s", message)
            print(f"\nThe MedSAM2 app cannot start: {message}\n", file=sys.stderr, flush=True)
            os._exit(2)

    def _setup(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        # every --conf value parsed and checked once, before any checkpoint download: a typo is reported at once
        self.settings = parse_settings(conf)
        self.dicomweb_timeout_s = self.settings.dicomweb_timeout_s
        self.pacs_resend_every_s = self.settings.pacs_resend_every_s
        self.model_dir = os.path.join(app_dir, "model")
        configs = {c.split(".")[-2].lower(): c for c in get_class_names(lib.configs, "TaskConfig")}
        self.models: dict[str, TaskConfig] = {}
        for name, cls_path in sorted(configs.items()):
            if name in self.settings.models:
                module_name, cls_name = cls_path.rsplit(".", 1)
                module = __import__(module_name, fromlist=[cls_name])
                task_config: TaskConfig = getattr(module, cls_name)()
                task_config.init(name, self.model_dir, conf, None, settings=self.settings)
                self.models[name] = task_config
        for task_config in self.models.values():  # temporary files of a publish or download that was killed
            provider = getattr(task_config, "provider", None)
            if provider is not None:
                remove_unfinished_checkpoint_writes(provider.published)
                remove_unfinished_checkpoint_writes(provider.base.path)
                remove_unfinished_checkpoint_writes(provider.adapter)
        self.admission = AdmissionGate(AdmissionSettings.from_settings(self.settings))
        self.auto_train = AutoTrain(self.settings.auto_train_after)
        self._warm_errors: dict[str, str] = {}
        self.warm_up: dict[str, float | str | None] = {}  # per model: seconds the warm-up took, or why it failed
        self.replica = self.settings.replica_name or default_replica_name(settings.MONAI_LABEL_SERVER_PORT)
        self.training_lease = self._make_training_lease()
        self.patches = install_all(
            PatchContext(
                settings=settings,
                check_train=self._check_train_request,
                # threads beyond the gate's limits only refuse (503): a few spare ones keep refusals immediate
                infer_workers=self.admission.settings.max_concurrent + self.admission.settings.max_queued + 4,
                dicomweb_timeout_s=self.dicomweb_timeout_s,
                operations=OperationsSource(self.replica, self.operations_status, self.not_ready_reasons),
                on_image_opened=self.image_opened,
            )
        )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedSAM2",
            description="Promptable 3D medical image segmentation with SAM2-family models (MedSAM2, SAM2.1)",
            version=monailabel.__version__,
        )
        if self.auto_train.enabled and AUTO_TRAIN_MODEL not in self._trainers:
            logger.warning("--conf auto_train_after ignored: no %r trainer (training tasks are off)", AUTO_TRAIN_MODEL)
        if in_server():  # load the weights now, not on the first user's request; /health/ready says when done
            threading.Thread(target=self._warm_models, daemon=True, name="warm-models").start()

    def _providers(self) -> dict[str, Any]:
        return {n: c.provider for n, c in self.models.items() if getattr(c, "provider", None) is not None}

    def _make_training_lease(self) -> TrainingLease | None:
        """The training lock sits beside the published checkpoint: replicas that share it share the lock."""
        published = [p.published for p in self._providers().values() if p.published is not None]
        return TrainingLease(published[0].parent, self.replica) if published else None

    def _warm_models(self) -> None:
        for name, provider in self._providers().items():
            try:
                provider.get()
                logger.info("Model %s loaded at start (%.1f s)", name, provider.load_seconds)
            except Exception as e:  # reported by /health/ready; a request retries the load
                self._warm_errors[name] = f"{type(e).__name__}: {e}"
                logger.error("Model %s could not be loaded at start: %s", name, e)
                continue
            if self.settings.warm_up != "on":
                continue
            segmenter = getattr(self.models[name], "segmenter", None)
            try:  # kernels set up (and CUDA graphs captured) now, not in the first user's request
                self.warm_up[name] = round(segmenter.warm_up(), 2) if segmenter is not None else None
                logger.info("Model %s warmed up (%.1f s)", name, self.warm_up[name] or 0.0)
            except Exception as e:  # only a first request that is slower: never a reason to stop serving
                self.warm_up[name] = f"failed: {type(e).__name__}: {e}"
                logger.warning("Model %s warm-up failed: %s", name, e)

    def not_ready_reasons(self) -> list[str]:
        """Why ``/health/ready`` answers 503: a model not loaded yet (or failed), or the datastore unreachable."""
        reasons = [
            f"model {name!r} "
            + (f"failed to load: {self._warm_errors[name]}" if name in self._warm_errors else "is loading")
            for name, provider in self._providers().items()
            if not provider.loaded
        ]
        datastore = self.datastore()
        if isinstance(datastore, PacsDatastore):
            problem = datastore.unreachable_reason()
        else:
            problem = (
                None
                if os.access(self.studies, os.R_OK | os.W_OK)
                else f"the studies folder {self.studies} is not writable"
            )
        return reasons + ([problem] if problem else [])

    def operations_status(self) -> dict[str, Any]:
        """What ``/metrics`` reports (keys: :class:`lib.server.operations.AppStatusCollector`)."""
        holder = self.training_lease.holder() if self.training_lease is not None else None
        stats = self._trainers[AUTO_TRAIN_MODEL].stats() if AUTO_TRAIN_MODEL in self._trainers else {}
        datastore = self.datastore()
        return {
            "admission": self.admission.snapshot(),
            "session_cache": {n: c.segmenter.cache.stats() for n, c in self.models.items() if hasattr(c, "segmenter")},
            "checkpoints": {
                n: {"name": p.checkpoint.name, "licence": p.checkpoint.licence, "version": p.version}
                for n, p in self._providers().items()
            },
            "training": {
                "running": 1 if holder else 0,
                "holder": holder.describe() if holder else None,
                "status": stats.get("status", ""),
                "last_dice": stats.get("best_metric"),
            },
            "pacs_labels_not_sent": datastore.status()["labels_not_sent"]
            if isinstance(datastore, PacsDatastore)
            else None,
        }

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")) and "googleapis.com" not in self.studies:
            datastore = self._init_pacs_datastore()
        elif self.studies.startswith(("http://", "https://")):
            datastore = super().init_datastore()
        else:
            patterns = [*settings.MONAI_LABEL_DATASTORE_FILE_EXT]
            patterns += [p for pattern in CINE_PATTERNS for p in (pattern, pattern.upper()) if p not in patterns]
            datastore = CineLocalDatastore(
                self.studies,
                extensions=patterns,
                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            )
        return datastore

    def _init_pacs_datastore(self) -> PacsDatastore:
        """DICOMweb with timeouts, 503s and SEG final labels (:mod:`lib.storage.pacs_datastore`)."""
        from monailabel.datastore.dicom import DICOMwebClientX

        session = TimeoutSession(self.dicomweb_timeout_s, pacs_credentials(settings))
        client = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        label_names: dict[str, int] = {}
        for task_config in self.models.values():
            label_names.update({k: v for k, v in getattr(task_config, "labels", {}).items() if k not in label_names})
        return PacsDatastore(
            client,
            settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache or None,
            label_names,
            timeout_s=self.dicomweb_timeout_s,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            # only the server resends; a training process reads labels and leaves
            resend_every_s=self.pacs_resend_every_s if in_server() else 0,
        )

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        """``PUT /datastore/label``: with ``--conf auto_train_after N``, the N-th final label since the last
        training start starts training (not while a run is under way)."""
        super().on_save_label(image_id, label_id)
        tag = tag_being_saved()
        if not self.auto_train.enabled or AUTO_TRAIN_MODEL not in self._trainers:
            return {}
        started = self.auto_train.label_saved(
            tag == DefaultLabelTag.FINAL.value, _training_under_way, _last_training_start, self._start_auto_training
        )
        return {"auto_train": {"started": started, "pending": self.auto_train.pending(_last_training_start())}}

    def _start_auto_training(self) -> bool:
        if self.training_lease is not None and self._take_training_lease(AUTO_TRAIN_MODEL) is not None:
            return False  # another replica trains: its run includes this label or the next one will
        return bool(self.async_training(AUTO_TRAIN_MODEL, enqueue=False))

    def _take_training_lease(self, model: str) -> str | None:
        """Take the cross-replica training lock for a run of ``model``; None when taken, else who holds it."""
        lease = self.training_lease
        if lease is None:
            return None
        if lease.held_here and not _training_under_way():
            lease.release()  # this replica's last run ended; its watcher has not noticed yet
        holder = lease.try_acquire(model)
        if holder is not None:
            return holder.describe()
        lease.release_when_done(_training_under_way)
        return None

    def _check_train_request(self, model: str, body: Any) -> None:
        """``POST /train/{model}``: refuse (4xx) an unknown model or a body its trainer would fail on, before a
        training process starts."""
        trainer = self._trainers.get(model)
        if trainer is None:
            raise Refused(404, f"Unknown training task {model!r}; available: {sorted(self._trainers)}")
        if isinstance(body, dict) and body.get("model") not in (None, model):
            raise Refused(422, f"The body names model {body['model']!r} but the URL names {model!r}.")
        check = getattr(trainer, "check_body", None)
        if check is not None:
            try:
                check(body)
            except ValueError as e:
                raise Refused(422, f"Training not started: {str(e).rstrip('.')}.") from None
        running = self._take_training_lease(model)
        if running is not None:
            raise Refused(
                409,
                f"Training not started: a training run is under way ({running}). One run at a time for all "
                "replicas; wait for it to finish (GET /train/ on that replica) or stop it there.",
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

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """Strategies that run the model take an inference slot first: MONAI Label runs them on its event loop,
        beside the inference threads, and two model calls at once are what ``max_concurrent_infers`` bounds."""
        strategy = request.get("strategy")
        if strategy and strategy not in self._strategies:
            raise NotFound(f"Unknown active-learning strategy {strategy!r}; available: {sorted(self._strategies)}.")
        if strategy in (None, "", "random", "first"):
            answer = super().next_sample(request)
        else:
            with self.admission.admit():
                answer = super().next_sample(request)
        if isinstance(answer, dict) and isinstance(answer.get("id"), str):
            self.image_opened(answer["id"], "next sample")  # the annotator opens it next
        return answer

    def image_opened(self, image_id: str, source: str) -> None:
        """A viewer opened (or is handed) this image: encode it in the background (:mod:`lib.engine.encode_ahead`).
        Returns at once; the image is read (downloaded from the PACS) by the background worker."""
        datastore = self.datastore()
        if isinstance(datastore, PacsDatastore) and not datastore.knows_image(image_id):
            return  # a SEG series or a series outside the datastore's filter

        def image_path() -> str:
            path = datastore.get_image_uri(image_id)
            if not path or not os.path.isfile(path):
                raise NotFound(f"Image {image_id!r} is not in the datastore.")
            return path

        for config in self.models.values():
            segmenter = getattr(config, "segmenter", None)
            if segmenter is not None:
                segmenter.open_ahead(image_id, source, image_path)

    def info(self) -> dict[str, Any]:
        meta = super().info()
        if not _training_under_way():  # a run whose process was killed (or stopped) never wrote its end
            for stats in meta.get("train_stats", {}).values():
                if isinstance(stats, dict) and stats.get("status") == "RUNNING":
                    stats["status"] = "INTERRUPTED"
        meta["replica"] = self.replica
        meta["checkpoints"] = {
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
            if hasattr(c, "checkpoint")
        }
        holder = self.training_lease.holder() if self.training_lease is not None else None
        meta["training_lock"] = {"held_by": holder.describe() if holder else None}
        if self.auto_train.enabled:
            meta["auto_train"] = {
                "after": self.auto_train.after,
                "final_labels_since_last_training": self.auto_train.pending(_last_training_start()),
            }
        if any(v["random_weights"] for v in meta["checkpoints"].values()):
            meta["warning"] = "RANDOM WEIGHTS: started with --conf checkpoint random; masks are meaningless."
        meta["admission"] = self.admission.snapshot()
        meta["patches"] = self.patches.as_dict()
        caches = {n: c.segmenter.cache for n, c in self.models.items() if hasattr(c, "segmenter")}
        meta["session_cache"] = {n: cache.stats() for n, cache in caches.items()}
        meta["warm_up"] = dict(self.warm_up)
        meta["encode_ahead"] = {
            n: c.segmenter.ahead.status() if c.segmenter.ahead is not None else None
            for n, c in self.models.items()
            if hasattr(c, "segmenter")
        }
        return meta

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise BadRequest("No image given: pass ?image=<image id> or upload a file.")
        if os.path.exists(image) and not is_upload(image):
            raise BadRequest("Image ids name datastore images, not server file paths.")
        if request.get("model") not in self._infers:
            raise NotFound(f"Unknown model {request.get('model')!r}; available: {sorted(self._infers)}")
        attach_label_file(request, datastore or self.datastore())
        with self.admission.admit() as waited_s:
            result = super().infer(request, datastore)
        if isinstance(result.get("params"), dict) and isinstance(result["params"].get("latencies"), dict):
            result["params"]["latencies"]["queue_wait"] = round(waited_s, 4)
        return result
