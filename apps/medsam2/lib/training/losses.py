"""SAM2's training loss on one frame (focal x20 + Dice + IoU L1 on the best candidate mask, BCE on the
object score) and the ``dice_ce`` alternative (cross-entropy + Dice instead of focal x20 + Dice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(2).mean(-1)  # (B, M)


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = logits.sigmoid().flatten(2)
    t = target.flatten(2)
    return 1 - (2 * (prob * t).sum(-1) + 1) / (prob.sum(-1) + t.sum(-1) + 1)  # (B, M)


def _mask_losses(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, M) loss of each candidate mask: ``sam2``: focal x20 + Dice; ``dice_ce``: cross-entropy + Dice."""
    if kind == "dice_ce":
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(-1)
        return ce + _dice_loss(logits, target)
    return 20 * _focal(logits, target) + _dice_loss(logits, target)


def frame_loss(
    multimask_logits: torch.Tensor,
    ious: torch.Tensor,
    object_score_logits: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """SAM2's loss on one frame: the best of the candidate masks gets its mask loss (``sam2``: focal x20 + Dice;
    ``dice_ce``: cross-entropy + Dice) plus the L1 error of its predicted IoU (which SAM2 reads to choose among its
    candidates); the object score gets BCE. Objects absent from the frame only train the object score.
    ``valid`` (B,): 0 for objects whose clip has already ended (padding of a batch of clips), which count nowhere.
    """
    target = target.expand_as(multimask_logits).float()
    weight = torch.ones(target.shape[0], device=target.device) if valid is None else valid.float()
    present = (target.flatten(1).amax(-1) > 0).float() * weight  # (B,)
    score_bce = F.binary_cross_entropy_with_logits(
        object_score_logits[:, 0].float(), (target.flatten(1).amax(-1) > 0).float(), reduction="none"
    )
    score_loss = (score_bce * weight).sum() / weight.sum().clamp(min=1)
    combo = _mask_losses(multimask_logits, target, kind)
    best = combo.argmin(dim=1)
    rows = torch.arange(combo.shape[0], device=combo.device)
    with torch.no_grad():
        pred = multimask_logits > 0
        inter = (pred & (target > 0)).flatten(2).sum(-1).float()
        union = (pred | (target > 0)).flatten(2).sum(-1).float()
        actual_iou = inter / union.clamp(min=1)
    iou_loss = F.l1_loss(ious.float(), actual_iou, reduction="none")
    per_obj = combo[rows, best] + iou_loss[rows, best]
    return (per_obj * present).sum() / present.sum().clamp(min=1) + score_loss
