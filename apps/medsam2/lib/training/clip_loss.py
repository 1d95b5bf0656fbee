"""A clip forwarded through SAM2 as SAM2 trains (prompts on slice 0, memory through the rest) and its loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lib.engine import sam2_api
from lib.engine.preprocessing import frames_to_model_input
from lib.training.data import Clip
from lib.training.losses import frame_loss
from lib.training.settings import TrainSettings
from lib.training.simulated_prompts import add_correction_click, simulate_prompts


def clip_loss(model, clip: Clip, settings: TrainSettings, rng: np.random.Generator, device, autocast) -> torch.Tensor:
    """Forward a clip through SAM2 as in training (prompt on slice 0, memory through the rest)."""
    t_len, b = clip.masks.shape[:2]
    size = model.image_size
    images = frames_to_model_input(clip.frames, size, device)
    gt = torch.from_numpy(clip.masks).float().to(device)
    gt = F.interpolate(gt, size=(size, size), mode="nearest")  # (T, B, S, S)
    point_inputs, mask_inputs = simulate_prompts(clip.masks[0], settings, rng, size)
    if point_inputs is not None:
        point_inputs = {k: v.to(device) for k, v in point_inputs.items()}
    if mask_inputs is not None:
        mask_inputs = F.interpolate(mask_inputs.to(device), size=(size, size), mode="nearest")
    with autocast:
        backbone = model.forward_image(images)
        _, feats, pos, sizes = sam2_api.prepare_backbone_features(model, backbone)
    output_dict: dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    total = torch.zeros((), device=device)
    for t in range(t_len):
        f_t = [x[:, t : t + 1].expand(-1, b, -1) for x in feats]
        p_t = [x[:, t : t + 1].expand(-1, b, -1) for x in pos]
        cond = t == 0
        with autocast:
            out, sam, _, _ = sam2_api.track_step(
                model,
                t,
                cond,
                f_t,
                p_t,
                sizes,
                point_inputs if cond else None,
                mask_inputs if cond else None,
                output_dict,
                t_len,
                False,
                None,
            )
            _, high_multi, ious, low, high, obj_ptr, score = sam
            if cond and point_inputs is not None and rng.random() < settings.p_correction:
                # one correction click from the error region, fed back with the previous mask as SAM2 does
                total = total + frame_loss(high_multi.float(), ious, score, gt[t][:, None], settings.loss)
                point_inputs = add_correction_click(point_inputs, high.detach(), gt[t], rng)
                out, sam, _, _ = sam2_api.track_step(
                    model, t, cond, f_t, p_t, sizes, point_inputs, None, output_dict, t_len, False, low.detach()
                )
                _, high_multi, ious, low, high, obj_ptr, score = sam
            out.update(pred_masks=low, pred_masks_high_res=high, obj_ptr=obj_ptr, object_score_logits=score)
            sam2_api.encode_memory_in_output(model, f_t, sizes, point_inputs if cond else None, True, high, score, out)
        output_dict["cond_frame_outputs" if cond else "non_cond_frame_outputs"][t] = out
        total = total + frame_loss(high_multi.float(), ious, score, gt[t][:, None], settings.loss)
    return total / t_len


class ClipLoss(torch.nn.Module):
    """:func:`clip_loss` as a module's ``forward``: DistributedDataParallel averages the gradients of what runs
    through the ``forward`` of the module it wraps, and ``clip_loss`` calls SAM2's internals directly."""

    def __init__(self, model: torch.nn.Module, settings: TrainSettings, device: torch.device, autocast):
        super().__init__()
        self.model = model
        self.settings = settings
        self.device = device
        self.autocast = autocast

    def forward(self, clip: Clip, rng: np.random.Generator) -> torch.Tensor:
        return clip_loss(self.model, clip, self.settings, rng, self.device, self.autocast)
