"""What the app says about itself beyond MONAI Label's ``/info``: the served checkpoints, training, admission,
patches, session caches, warm-up and encode-ahead; the ``/metrics`` snapshot; why ``/health/ready`` is not."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from monailabel.interfaces.datastore import Datastore

from lib.server.admission import AdmissionGate
from lib.server.patches import PatchReport
from lib.server.served_models import ServedModels
from lib.server.training_runs import TrainingRuns
from lib.storage.pacs_datastore import PacsDatastore

RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS: started with --conf checkpoint random; masks are meaningless."


class AppStatus:
    """``patches`` is set once :func:`lib.server.patches.install_all` has run (it needs this object first)."""

    def __init__(
        self,
        replica: str,
        models: ServedModels,
        runs: TrainingRuns,
        admission: AdmissionGate,
        datastore: Callable[[], Datastore],
        studies: str,
    ):
        self.replica, self.models, self.runs, self.admission = replica, models, runs, admission
        self._get_datastore, self._studies = datastore, studies
        self.patches: PatchReport | None = None

    def info(self, meta: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's ``/info`` (``meta``) with the app's own entries."""
        self.runs.info(meta)
        meta["replica"] = self.replica
        meta["checkpoints"] = self.models.checkpoints()
        if any(v["random_weights"] for v in meta["checkpoints"].values()):
            meta["warning"] = RANDOM_WEIGHTS_WARNING
        meta["admission"] = self.admission.snapshot()
        meta["patches"] = self.patches.as_dict() if self.patches is not None else None
        meta["session_cache"] = self.models.session_caches()
        meta["warm_up"] = dict(self.models.warm_up)
        meta["encode_ahead"] = self.models.encode_ahead()
        self._added_label_names(meta)
        return meta

    def _added_label_names(self, meta: dict[str, Any]) -> None:
        """Names annotators added to images (docs/api.md): in every model's labels (one value per name, so
        Slicer's label list shows them), and per image under ``label_names``."""
        store = getattr(self._get_datastore(), "names_store", None)
        if store is None:
            return
        added = store.added()
        for model in (meta.get("models") or {}).values():
            labels = model.get("labels") if isinstance(model, dict) else None
            if isinstance(labels, dict):
                model["labels"] = {**labels, **{k: v for k, v in added.items() if k not in labels}}
        meta["label_names"] = {"added": added, "images": store.added_by_image()}

    def not_ready_reasons(self) -> list[str]:
        """Why ``/health/ready`` answers 503: a model not loaded yet (or failed), or the datastore unreachable."""
        datastore = self._get_datastore()
        if isinstance(datastore, PacsDatastore):
            problem = datastore.unreachable_reason()
        elif not os.access(self._studies, os.R_OK | os.W_OK):
            problem = f"the studies folder {self._studies} is not writable"
        else:
            problem = None
        return self.models.not_loaded() + ([problem] if problem else [])

    def operations(self) -> dict[str, Any]:
        """What ``/metrics`` reports (keys: :class:`lib.server.operations.AppStatusCollector`)."""
        datastore = self._get_datastore()
        return {
            "admission": self.admission.snapshot(),
            "session_cache": self.models.session_caches(),
            "checkpoints": self.models.checkpoint_metrics(),
            "training": self.runs.metrics(),
            "pacs_labels_not_sent": datastore.status()["labels_not_sent"]
            if isinstance(datastore, PacsDatastore)
            else None,
        }
