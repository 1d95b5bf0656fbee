"""Thin MONAI Label inference tasks over :class:`lib.engine.segmenter.MedSAM2Segmenter`."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.engine.changed_region import ChangedRegion
from lib.engine.label_map import LabelMap
from lib.engine.refine import LabelFile
from lib.engine.request import SegmentRequest
from lib.engine.segmenter import MedSAM2Segmenter
from lib.errors import PromptError
from lib.imaging.label_region import REGION_SUFFIX, write_label_region
from lib.imaging.volume_io import label_suffix, write_label
from lib.storage.label_sources import LABEL_FILE_KEY, LABEL_NAMES_KEY

logger = logging.getLogger(__name__)


class MedSAM2Infer(InferTask):
    """2D: prompts on one slice. 3D: key-slice prompts propagated through the volume. Scribbles: Slicer's scribbles
    (an uploaded label volume) refining the segment being edited, in 3D."""

    interactive = True  # needs prompts: no batch inference over the datastore

    def __init__(
        self,
        segmenter: MedSAM2Segmenter,
        dimension: int,
        labels: dict[str, int],
        model_info: dict,
        scribbles: bool = False,
    ):
        what = "one slice from a box and clicks" if dimension == 2 else "3D propagation from key-slice prompts"
        if scribbles:
            what = "scribbles on key slices refining a segment, propagated through the scribbles ROI"
        random_note = " [RANDOM WEIGHTS: development only]" if model_info.get("random_weights") else ""
        super().__init__(
            type=InferType.SCRIBBLES if scribbles else InferType.DEEPGROW,
            labels=labels,
            dimension=dimension,
            description=f"MedSAM2 ({model_info.get('checkpoint')}): {what}{random_note}",
            config=_viewer_options(dimension, scribbles, model_info),  # Slicer shows these and sends them back
        )
        self.segmenter = segmenter
        self.model_info = model_info
        self.scribbles = scribbles

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["checkpoint"] = dict(self.model_info)
        return info

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # read once; the segmenter takes it as it is. Names added to the image (docs/api.md) join the task's labels
        typed = self.segmenter.request(request, self.dimension, self._image_labels(request))
        run = self.segmenter.segment_2d if self.dimension == 2 else self.segmenter.segment_3d
        label_file = self._label_file(request, typed)
        label, result, reference = run(str(request.get("image") or ""), typed, label_file)
        target = _segment_imported(request, self.scribbles)
        if self.dimension == 3 and target is not None:
            # Slicer imports a 3D answer's value 1 into the segment it asked for (the segment being scribbled, or
            # deepgrow's label): answer that label as a 0/1 mask, not with its value in the label map.
            value = result["label_names"].get(target) or typed.labels.resolve(target)[1]
            label = (label == value).astype("uint8")
            result["label_values"] = {str(target): 1}
        if "hint" in result:  # OHIF asks for the label image only: the server log is where its users see this
            logger.info("medsam2_3d on %s: %s", request.get("image"), result["hint"])
        return _write_answer(label, reference, request, result), result

    def _image_labels(self, request: dict[str, Any]) -> LabelMap | None:
        added = request.get(LABEL_NAMES_KEY)
        if not isinstance(added, dict) or not added:
            return None
        return LabelMap({**self.labels, **{k: v for k, v in added.items() if k not in self.labels}})

    def _label_file(self, request: dict[str, Any], typed: SegmentRequest) -> LabelFile | None:
        source = request.get(LABEL_FILE_KEY)
        if not isinstance(source, dict):
            if self.scribbles and not typed.history_step:
                raise PromptError(
                    "The scribbles model needs the scribbles: upload a label volume with the request (the 'label' "
                    "file) holding foreground_scribbles and background_scribbles, as Slicer's scribbles tool does."
                )
            return None
        return LabelFile(source["path"], source["source"], request.get("label_info"), self.scribbles)


def _write_answer(label: np.ndarray, reference: Any, request: dict[str, Any], result: dict[str, Any]) -> str:
    """The answer's label file: with ``changed_since``, the changed box as a gzip NRRD (docs/api.md); else the
    whole label in the file type the viewer parses (OHIF's panel raw NRRD, ``result_compress`` false; Slicer any)."""
    region = result.get("changed_region")
    suffix = REGION_SUFFIX if region else label_suffix(request.get("result_extension"))
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        path = f.name
    if region:
        box = ChangedRegion.from_json(region).crop(label)
        write_label_region(box, reference, region["offset_ijk"], path, result.get("answer_id"))
    else:
        write_label(label, reference, path, compress=request.get("result_compress") is not False)
    return path


def _viewer_options(dimension: int, scribbles: bool, model_info: dict) -> dict[str, Any]:
    if scribbles:
        return {"scribble_mode": ["points", "mask"]}
    if dimension == 3:
        return {"reset_state": False, "correction": False, "stop_rule": bool(model_info.get("stop_rule"))}
    return {}


def _segment_imported(request: dict[str, Any], scribbles: bool) -> str | None:
    """The Slicer segment a 3D answer is imported into (Slicer alone sends ``result_extension``), if any."""
    if scribbles:
        return request.get("selected_label_name") or request.get("label") or None
    if "result_extension" in request and request.get("label") is not None:
        return str(request["label"])
    return None
