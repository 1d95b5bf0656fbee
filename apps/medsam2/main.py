"""MONAI Label app serving SAM2-family models (MedSAM2 or stock SAM2.1): 2D box prompting and 3D propagation.

Wiring only: what the app does around MONAI Label lives in ``lib/server`` (docs/layers.md)."""

from __future__ import annotations

import os
from typing import Any

import monailabel
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import lib.configs
from lib.server import app_requests
from lib.server.access_control import AuthOptions
from lib.server.admission import AdmissionGate, AdmissionSettings
from lib.server.app_status import AppStatus
from lib.server.auto_train import AutoTrain
from lib.server.operations import OperationsSource
from lib.server.patches import PatchContext, install_all
from lib.server.saved_label_tag import tag_being_saved
from lib.server.served_models import ServedModels, discover_models
from lib.server.server_process import in_server
from lib.server.startup import stop_in_one_line
from lib.server.training_runs import TrainingRuns
from lib.settings import parse_settings
from lib.storage.datastores import make_datastore
from lib.training.lease import default_replica_name


class MedSAM2App(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        with stop_in_one_line():
            # every --conf value parsed and checked once, before any checkpoint download: a typo is reported at once
            self.settings = s = parse_settings(conf)
            configs = discover_models(lib.configs, os.path.join(app_dir, "model"), conf, s)
            self.models = ServedModels(configs, warm_up=s.warm_up == "on")
            self.models.remove_unfinished_writes()
            self.admission = AdmissionGate(AdmissionSettings.from_settings(s))
            self.replica = s.replica_name or default_replica_name(settings.MONAI_LABEL_SERVER_PORT)
            self.runs = TrainingRuns(
                self.models.published_folder(),
                self.replica,
                AutoTrain(s.auto_train_after),
                trainers=lambda: self._trainers,
                start=lambda model: bool(self.async_training(model, enqueue=False)),
            )
            self.status = AppStatus(self.replica, self.models, self.runs, self.admission, self.datastore, studies)
            self.status.patches = install_all(self._patch_context())
            description = "Promptable 3D medical image segmentation with SAM2-family models (MedSAM2, SAM2.1)"
            super().__init__(app_dir, studies, conf, "MedSAM2", description, monailabel.__version__)
            self.runs.warn_if_auto_train_cannot_run()
            if in_server():  # load the weights now, not on the first user's request; /health/ready says when done
                self.models.start_loading()

    def _patch_context(self) -> PatchContext:
        s = self.settings
        return PatchContext(
            settings=settings,
            check_train=self.runs.check_request,
            # threads beyond the gate's limits only refuse (503): a few spare ones keep refusals immediate
            infer_workers=self.admission.settings.max_concurrent + self.admission.settings.max_queued + 4,
            dicomweb_timeout_s=s.dicomweb_timeout_s,
            operations=OperationsSource(self.replica, self.status.operations, self.status.not_ready_reasons),
            on_image_opened=self.image_opened,
            allow_untested_monailabel=s.allow_untested_monailabel,
            datastore=self.datastore,
            auth=AuthOptions(s.auth_audience, s.auth_issuer, s.api_keys_file, s.ohif_client_id),
            sessions=self.heartbeat,
            pacs_token_file=s.pacs_token_file,
        )

    def init_datastore(self) -> Datastore:
        s = self.settings
        resend_every_s = s.pacs_resend_every_s if in_server() else 0  # a training process reads labels and leaves
        names = self.models.label_names()
        own = super().init_datastore
        return make_datastore(self.studies, names, s.dicomweb_timeout_s, resend_every_s, own, s.pacs_token_file)

    def init_infers(self) -> dict[str, InferTask]:
        return {name: task for config in self.models.models.values() for name, task in config.infer().items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {name: config.trainer() for name, config in self.models.items()}

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        return strategies | {n: s for config in self.models.models.values() for n, s in config.strategy().items()}

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        super().on_save_label(image_id, label_id)
        return self.runs.label_saved(tag_being_saved())

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        run = super().next_sample
        return app_requests.next_sample(request, self._strategies, self.admission, run, self.image_opened)

    def heartbeat(self, image_id: str, session_name: str | None) -> int:
        return self.models.heartbeat(image_id, session_name)

    def image_opened(self, image_id: str, source: str) -> None:
        app_requests.image_opened(image_id, source, self.datastore(), self.models)

    def info(self) -> dict[str, Any]:
        return self.status.info(super().info())

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        app_requests.prepare_infer_request(request, self._infers, datastore or self.datastore())
        with self.admission.admit() as waited_s:
            result = super().infer(request, datastore)
        if isinstance(result.get("params"), dict) and isinstance(result["params"].get("latencies"), dict):
            result["params"]["latencies"]["queue_wait"] = round(waited_s, 4)
        return result
