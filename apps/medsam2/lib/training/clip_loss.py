"""Clips forwarded through SAM2 as SAM2 trains (prompts on slice 0, memory through the rest) and their loss.

Several clips train in one step: their objects form one batch (SAM2 tracks each object on its own image
features, so objects of different clips can share a step), their slices are encoded in one batch, and clips
shorter than the longest repeat their last slice with a zero loss weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lib.engine import sam2_api
from lib.training.data import Clip
from lib.training.encoder_features import EncoderFeatureCache, SliceKey, encode_slices
from lib.training.losses import frame_loss
from lib.training.settings import TrainSettings
from lib.training.simulated_prompts import add_correction_click, prompt_kind, simulate_prompts


@dataclass
class ClipBatch:
    """Clips laid out for one step: the distinct slices, and per step ``t`` and object which slice it sees."""

    keys: list[SliceKey]  # distinct (study, slice)
    frames: list[np.ndarray]  # (H, W) uint8, one per key (studies may differ in size)
    slice_of: torch.Tensor  # (T, B) long: row of ``frames`` that object b sees at step t
    valid: torch.Tensor  # (T, B) float: 0 once the object's clip has ended
    targets: torch.Tensor  # (T, B, S, S) float, the objects' masks at the model's input size
    first_masks: list[np.ndarray]  # per clip (b, H, W) bool: the masks the simulated annotator prompts


def batch_clips(clips: Sequence[Clip], size: int) -> ClipBatch:
    """Lay ``clips`` out for one step of objects tracked together (slices at the model's input size)."""
    t_len = max(c.frames.shape[0] for c in clips)
    keys: list[SliceKey] = []
    rows: dict[SliceKey, int] = {}
    frames, slice_cols, valid_cols, target_cols = [], [], [], []
    for n, clip in enumerate(clips):
        length, b = clip.masks.shape[:2]
        slices = clip.slices if clip.slices is not None else np.arange(length)
        study = clip.study or f"clip{n}"
        row_of_t = []
        for t in range(length):
            key = (study, int(slices[t]))
            if key not in rows:
                rows[key] = len(keys)
                keys.append(key)
                frames.append(clip.frames[t])
            row_of_t.append(rows[key])
        steps = np.minimum(np.arange(t_len), length - 1)
        slice_cols.append(np.repeat(np.array(row_of_t)[steps][:, None], b, axis=1))
        valid_cols.append(np.repeat((np.arange(t_len) < length)[:, None], b, axis=1))
        masks = torch.from_numpy(clip.masks[steps]).float()
        target_cols.append(F.interpolate(masks, size=(size, size), mode="nearest"))
    return ClipBatch(
        keys,
        frames,
        torch.from_numpy(np.concatenate(slice_cols, axis=1)).long(),
        torch.from_numpy(np.concatenate(valid_cols, axis=1)).float(),
        torch.cat(target_cols, dim=1),
        [c.masks[0] for c in clips],
    )


def _pad_points(parts: list[dict]) -> dict:
    """Per-clip point prompts in one batch, padded with label -1 (which SAM's prompt encoder ignores)."""
    width = max(p["point_coords"].shape[1] for p in parts)
    coords, labels = [], []
    for p in parts:
        pad = width - p["point_coords"].shape[1]
        coords.append(F.pad(p["point_coords"], (0, 0, 0, pad)))
        labels.append(F.pad(p["point_labels"], (0, pad), value=-1))
    return {"point_coords": torch.cat(coords), "point_labels": torch.cat(labels)}


def simulate_batch_prompts(batch: ClipBatch, settings: TrainSettings, rng: np.random.Generator, size: int):
    """One kind of prompt for the whole step (SAM2 takes points or a mask per call), drawn per clip."""
    kind = prompt_kind(settings, rng)
    parts = [simulate_prompts(m, rng, size, kind) for m in batch.first_masks]
    if kind == "mask":
        return None, torch.cat([F.interpolate(m, size=(size, size), mode="nearest") for _, m in parts])
    return _pad_points([p for p, _ in parts]), None


@dataclass
class PreparedStep:
    """A training step's input, prepared ahead of it (see :class:`lib.training.prefetch.StepPrefetcher`):
    the clips laid out as one batch, and the simulated annotator's prompts on their first slices."""

    batch: ClipBatch
    point_inputs: dict | None
    mask_inputs: torch.Tensor | None
    slices: int


def prepare_step(clips: Sequence[Clip], settings: TrainSettings, rng: np.random.Generator, size: int) -> PreparedStep:
    batch = batch_clips(clips, size)
    point_inputs, mask_inputs = simulate_batch_prompts(batch, settings, rng, size)
    return PreparedStep(batch, point_inputs, mask_inputs, sum(c.frames.shape[0] for c in clips))


def step_loss(
    model, step: PreparedStep, settings: TrainSettings, rng: np.random.Generator, device, autocast, cache=None
) -> torch.Tensor:
    """The mean per-slice SAM2 loss of a step's clips tracked together (prompt on slice 0, memory through the
    rest); ``rng`` draws the correction clicks, which depend on the predictions."""
    batch = step.batch
    gt, valid, slice_of = (x.to(device) for x in (batch.targets, batch.valid, batch.slice_of))
    point_inputs = {k: v.to(device) for k, v in step.point_inputs.items()} if step.point_inputs else None
    mask_inputs = step.mask_inputs.to(device) if step.mask_inputs is not None else None
    backbone = encode_slices(model, batch.keys, batch.frames, device, autocast, cache)
    with autocast:
        _, feats, pos, sizes = sam2_api.prepare_backbone_features(model, backbone)
    t_len = slice_of.shape[0]
    output_dict: dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    total = torch.zeros((), device=device)
    for t in range(t_len):
        f_t = [x.index_select(1, slice_of[t]) for x in feats]
        p_t = [x.index_select(1, slice_of[t]) for x in pos]
        cond = t == 0
        out = _track(model, t, t_len, f_t, p_t, sizes, output_dict, autocast, point_inputs, mask_inputs)
        if cond and point_inputs is not None and rng.random() < settings.p_correction:
            # one correction click from the error region, fed back with the previous mask as SAM2 does
            total = total + frame_loss(*out.scored, gt[t][:, None], settings.loss, valid[t])
            point_inputs = add_correction_click(point_inputs, out.high.detach(), gt[t], rng)
            out = _track(model, t, t_len, f_t, p_t, sizes, output_dict, autocast, point_inputs, None, out.low)
        with autocast:
            sam2_api.encode_memory_in_output(
                model, f_t, sizes, point_inputs if cond else None, True, out.high, out.score, out.out
            )
        output_dict["cond_frame_outputs" if cond else "non_cond_frame_outputs"][t] = out.out
        total = total + frame_loss(*out.scored, gt[t][:, None], settings.loss, valid[t])
    return total / t_len


def batch_loss(
    model, clips: Sequence[Clip], settings: TrainSettings, rng: np.random.Generator, device, autocast, cache=None
) -> torch.Tensor:
    """:func:`step_loss` of ``clips``, prepared here (prompts drawn from ``rng``)."""
    step = prepare_step(clips, settings, rng, model.image_size)
    return step_loss(model, step, settings, rng, device, autocast, cache)


@dataclass
class _Step:
    out: dict
    high_multi: torch.Tensor
    ious: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    score: torch.Tensor

    @property
    def scored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.high_multi.float(), self.ious, self.score


def _track(model, t, t_len, f_t, p_t, sizes, output_dict, autocast, point_inputs, mask_inputs, prev_low=None):
    """SAM2's track step on step ``t`` (prompts only on the first), its outputs stored as SAM2 stores them."""
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
            prev_low,
        )
    _, high_multi, ious, low, high, obj_ptr, score = sam
    out.update(pred_masks=low, pred_masks_high_res=high, obj_ptr=obj_ptr, object_score_logits=score)
    return _Step(out, high_multi, ious, low, high, score)


class ClipLoss(torch.nn.Module):
    """:func:`step_loss` as a module's ``forward``: DistributedDataParallel averages the gradients of what runs
    through the ``forward`` of the module it wraps, and ``step_loss`` calls SAM2's internals directly."""

    def __init__(self, model: torch.nn.Module, settings: TrainSettings, device: torch.device, autocast):
        super().__init__()
        self.model = model
        self.settings = settings
        self.device = device
        self.autocast = autocast
        megabytes = settings.feature_cache_mb
        self.cache = EncoderFeatureCache(megabytes * 2**20) if megabytes > 0 else None

    def forward(self, step: PreparedStep, rng: np.random.Generator) -> torch.Tensor:
        return step_loss(self.model, step, self.settings, rng, self.device, self.autocast, self.cache)
