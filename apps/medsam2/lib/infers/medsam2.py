"""Thin MONAI Label inference tasks over :class:`lib.engine.segmenter.MedSAM2Segmenter`."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.engine.segmenter import MedSAM2Segmenter
from lib.imaging.volume_io import label_suffix, write_label

logger = logging.getLogger(__name__)


class MedSAM2Infer(InferTask):
    """2D: a box/clicks on one slice. 3D: key-slice prompts propagated through the volume."""

    interactive = True  # needs prompts: no batch inference over the datastore

    def __init__(self, segmenter: MedSAM2Segmenter, dimension: int, labels: dict[str, int], model_info: dict):
        what = "one slice from a box and clicks" if dimension == 2 else "3D propagation from key-slice prompts"
        random_note = " [RANDOM WEIGHTS: development only]" if model_info.get("random_weights") else ""
        super().__init__(
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=dimension,
            description=f"MedSAM2 ({model_info.get('checkpoint')}): {what}{random_note}",
            # shown as options in Slicer, which sends them with every request
            config=(
                {"reset_state": False, "correction": False, "stop_rule": bool(model_info.get("stop_rule"))}
                if dimension == 3
                else {}
            ),
        )
        self.segmenter = segmenter
        self.model_info = model_info

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["checkpoint"] = dict(self.model_info)
        return info

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        run = self.segmenter.segment_2d if self.dimension == 2 else self.segmenter.segment_3d
        label, result, reference = run(str(request.get("image") or ""), request)
        if self.dimension == 3 and "result_extension" in request and request.get("label") is not None:
            # The Slicer plugin (it alone sends result_extension) imports a 3D answer's value 1 into the segment
            # of the label it asked for: answer that label as a 0/1 mask, not with its value in the label map.
            label = (label == result["prompts"][0]["label_value"]).astype("uint8")
            result["label_values"] = {str(request["label"]): 1}
        if "hint" in result:  # OHIF asks for the label image only: the server log is where its users see this
            logger.info("medsam2_3d on %s: %s", request.get("image"), result["hint"])
        # the viewers name the file type they parse: OHIF's panel raw NRRD (result_compress false), Slicer any
        with tempfile.NamedTemporaryFile(suffix=label_suffix(request.get("result_extension")), delete=False) as f:
            path = f.name
        write_label(label, reference, path, compress=request.get("result_compress") is not False)
        return path, result
