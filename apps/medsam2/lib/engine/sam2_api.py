"""The one door to SAM2's private methods: every call the app makes to a ``SAM2Base`` method whose name starts
with an underscore, and the use of SAM2's private CUDA extension ``sam2._C``, goes through a function here
(``tests/test_sam2_api.py`` enforces it).

SAM2's public predictors re-encode images, keep one state per video and hide the predicted IoU; the engine's
batched propagation, its static tracking step and the trainer drive SAM2's building blocks directly instead.
These are pinned to ``sam2==1.1.0``; the stock-equivalence tests (``tests/test_propagation_matches_stock.py``)
check that what they compute is what SAM2's own predictor computes.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # SAM2's optional CUDA extension, which its small-hole filling needs
    from sam2 import _C  # noqa: F401
    from sam2.utils.misc import fill_holes_in_mask_scores

    _HAS_SAM2_EXTENSION = True
except ImportError:
    _HAS_SAM2_EXTENSION = False


def prepare_backbone_features(model: Any, backbone_out: dict) -> tuple:
    """``SAM2Base._prepare_backbone_features``: (backbone_out, vision_feats, vision_pos_embeds, feat_sizes), the
    feature levels flattened to (HW, B, C)."""
    return model._prepare_backbone_features(backbone_out)


def track_step(model: Any, *args: Any, **kwargs: Any) -> tuple:
    """``SAM2Base._track_step``: one frame's (current_out, sam_outputs, high_res_features, pix_feat), before the
    memory encoder runs (arguments as SAM2's: frame_idx, is_init_cond_frame, current_vision_feats, ...)."""
    return model._track_step(*args, **kwargs)


def encode_memory_in_output(model: Any, *args: Any) -> None:
    """``SAM2Base._encode_memory_in_output``: run the memory encoder on a step's mask and store the memory
    (``maskmem_features``, ``maskmem_pos_enc``) in its output dict."""
    model._encode_memory_in_output(*args)


def encode_new_memory(model: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``SAM2Base._encode_new_memory``: (memory features, memory position encodings) of a mask."""
    return model._encode_new_memory(*args, **kwargs)


def forward_sam_heads(model: Any, **kwargs: Any) -> tuple:
    """``SAM2Base._forward_sam_heads``: prompt encoder + mask decoder on memory-conditioned features."""
    return model._forward_sam_heads(**kwargs)


def multimask_on_tracked_frames(model: Any) -> bool:
    """Whether SAM2 decodes several candidate masks on a tracked (non-prompted) frame:
    ``SAM2Base._use_multimask(False, None)``."""
    return model._use_multimask(False, None)


def fill_small_holes(model: Any, mask_logits: torch.Tensor) -> torch.Tensor:
    """SAM2's post-processing of a tracked mask: holes up to ``model.fill_hole_area`` pixels filled, as the stock
    predictor does; unchanged without SAM2's optional CUDA extension (``sam2._C``, which the stock predictor then
    skips too) or with ``fill_hole_area`` 0."""
    if _HAS_SAM2_EXTENSION and getattr(model, "fill_hole_area", 0) > 0:
        return fill_holes_in_mask_scores(mask_logits, model.fill_hole_area)
    return mask_logits


def track_step_with_iou(model: Any, run_mem_encoder: bool, **step_inputs: Any) -> dict:
    """``SAM2Base.track_step``, keeping the predicted IoU of the chosen mask (``iou``) that track_step drops."""
    out, sam_outputs, _, _ = track_step(model, **step_inputs)
    _, _, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits = sam_outputs
    out.update(
        pred_masks=low_res_masks,
        pred_masks_high_res=high_res_masks,
        obj_ptr=obj_ptr,
        object_score_logits=object_score_logits,
        iou=ious.max(dim=-1).values,  # the mask SAM2 picks is the one with the highest predicted IoU
    )
    encode_memory_in_output(
        model,
        step_inputs["current_vision_feats"],
        step_inputs["feat_sizes"],
        step_inputs["point_inputs"],
        run_mem_encoder,
        high_res_masks,
        object_score_logits,
        out,
    )
    return out
