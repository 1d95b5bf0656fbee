"""The one door to SAM2's private methods: every call the app makes to a ``SAM2Base`` method whose name starts
with an underscore, and the use of SAM2's private CUDA extension ``sam2._C``, goes through a function here
(``tests/test_sam2_api.py`` enforces it).

SAM2's public predictors re-encode images, keep one state per video and hide the predicted IoU; the engine's
batched propagation, its static tracking step and the trainer drive SAM2's building blocks directly instead.
These are pinned to ``sam2==1.1.0``; the stock-equivalence tests (``tests/test_propagation_matches_stock.py``)
check that what they compute is what SAM2's own predictor computes.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE

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


def heads_on_any_grid(view: Any) -> None:
    """Make ``view`` (a :func:`lib.engine.roi.model_view`) run :func:`tracked_slice_heads` where SAM2's methods
    call ``_forward_sam_heads``: a rectangular window's map is not the square SAM2's own method asserts."""
    view.__dict__["_forward_sam_heads"] = functools.partial(_heads_without_prompts, view)


def _heads_without_prompts(
    model: Any, backbone_features, point_inputs, mask_inputs, high_res_features, multimask_output
):
    if point_inputs is not None or mask_inputs is not None:
        raise ValueError("a window is only tracked on: key slices (prompts) are decoded on the whole frame")
    return tracked_slice_heads(model, backbone_features, high_res_features, multimask_output)


def tracked_slice_heads(
    model: Any, backbone_features: torch.Tensor, high_res_features, multimask_output: bool
) -> tuple:
    """What ``SAM2Base._forward_sam_heads`` returns for a tracked slice (no point or mask prompt) on a (B, C, h, w)
    map whose sides may differ: the same modules and steps, the high-res masks sized 16 x (h, w) instead of SAM2's
    square ``image_size`` (``tests/test_roi_tracking.py`` checks it against SAM2's on a square map)."""
    b, _, h, w = backbone_features.shape
    device = backbone_features.device
    no_point = (torch.zeros(b, 1, 2, device=device), -torch.ones(b, 1, dtype=torch.int32, device=device))
    sparse, dense = model.sam_prompt_encoder(points=no_point, boxes=None, masks=None)
    low_multi, ious, tokens, object_score_logits = model.sam_mask_decoder(
        image_embeddings=backbone_features,
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        repeat_image=False,
        high_res_features=high_res_features,
    )
    if model.pred_obj_scores:
        low_multi = torch.where(object_score_logits[:, None, None] > 0, low_multi, NO_OBJ_SCORE)
    low_multi = low_multi.float()
    size = (h * model.backbone_stride, w * model.backbone_stride)
    high_multi = F.interpolate(low_multi, size=size, mode="bilinear", align_corners=False)
    low, high, token = low_multi, high_multi, tokens[:, 0]
    if multimask_output:
        best, rows = torch.argmax(ious, dim=-1), torch.arange(b, device=device)
        low, high = low_multi[rows, best].unsqueeze(1), high_multi[rows, best].unsqueeze(1)
        token = tokens[rows, best] if tokens.size(1) > 1 else token
    return (
        low_multi,
        high_multi,
        ious,
        low,
        high,
        _object_pointer(model, token, object_score_logits),
        object_score_logits,
    )


def _object_pointer(model: Any, token: torch.Tensor, object_score_logits: torch.Tensor) -> torch.Tensor:
    obj_ptr = model.obj_ptr_proj(token)
    if model.pred_obj_scores:
        present = object_score_logits.sigmoid() if model.soft_no_obj_ptr else (object_score_logits > 0).float()
        if model.fixed_no_obj_ptr:
            obj_ptr = present * obj_ptr
        obj_ptr = obj_ptr + (1 - present) * model.no_obj_ptr
    return obj_ptr


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
