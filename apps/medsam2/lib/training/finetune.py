"""Fine-tuning SAM2 on annotated volumes, as SAM2/MedSAM2 train: clips of consecutive slices, several
objects per clip, a simulated annotator (jittered box, clicks or the mask on the first slice of the clip,
a correction click), SAM2's own loss; validation the way users segment (a box on a key slice, 3D
propagation with the serving engine), scored with Dice and NSD. No MONAI Label imports.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from lib.engine.precision import autocast_for
from lib.engine.preprocessing import IntensityWindow, frames_to_model_input, resolve_window, to_uint8
from lib.engine.prompts import KeySlicePrompt
from lib.engine.propagation import propagate_volume
from lib.engine.volume_session import VolumeSession
from lib.training.distributed import DistributedContext, any_rank, sum_over_ranks

logger = logging.getLogger(__name__)

TRAIN_PARTS = {
    "all": (),
    "no_image_encoder": ("image_encoder",),
    "no_encoders": ("image_encoder", "sam_prompt_encoder"),
}


@dataclass
class TrainSettings:
    """What a training run does; every field can come from the request or ``--conf``."""

    epochs: int = 10
    steps_per_epoch: int = 0  # 0: 4 clips per training study
    clip_length: int = 8
    max_objects: int = 3
    lr: float = 5e-5
    lr_image_encoder: float = 3e-5
    weight_decay: float = 0.1
    grad_clip: float = 0.1
    train_parts: str = "no_image_encoder"
    loss: str = "sam2"  # "sam2": focal x20 + dice + IoU L1 + object score; "dice_ce"
    val_fraction: float = 0.2
    nsd_tolerance_mm: float = 2.0
    p_box: float = 0.5  # else clicks (or, with p_mask, the mask)
    p_mask: float = 0.0  # SAM2-style mask prompts: off by default, see README (they slowed learning here)
    p_correction: float = 0.0  # a correction click on the prompt slice, likewise
    p_cross_end: float = 0.5  # clips that start near an object's end and run past it (see sample_clip)
    seed: int = 0

    def __post_init__(self):
        if self.train_parts not in TRAIN_PARTS:
            raise ValueError(f"train_parts must be one of {sorted(TRAIN_PARTS)}, got {self.train_parts!r}")
        if self.loss not in ("sam2", "dice_ce"):
            raise ValueError(f"loss must be 'sam2' or 'dice_ce', got {self.loss!r}")
        if self.epochs < 1 or self.clip_length < 1 or self.max_objects < 1:
            raise ValueError("epochs, clip_length and max_objects must be >= 1")


@dataclass
class Study:
    """A volume as uint8 frames (k, j, i), its label map, and its voxel spacing (k, j, i) in mm."""

    name: str
    frames: np.ndarray
    label: np.ndarray
    spacing_kji: tuple[float, float, float]

    @cached_property
    def extents(self) -> dict[int, tuple[int, int]]:
        """First and last slice of each label value."""
        found: dict[int, tuple[int, int]] = {}
        for k in np.nonzero(self.label.reshape(self.label.shape[0], -1).any(axis=1))[0]:
            for v in np.unique(self.label[k]):
                if v:
                    first, _ = found.get(int(v), (int(k), int(k)))
                    found[int(v)] = (first, int(k))
        return found


def load_study(name: str, image_path: str, label_path: str, window: IntensityWindow) -> Study:
    from lib.imaging.volume_io import load_image  # SimpleITK: only needed for files

    image = load_image(image_path)
    label = load_image(label_path).array
    if label.shape != image.array.shape:
        raise ValueError(f"{name}: label shape {label.shape} differs from the image's {image.array.shape}")
    frames = to_uint8(image.array, resolve_window(window, image.array))
    sx, sy, sz = image.spacing
    return Study(name, frames, label.astype(np.uint8), (sz, sy, sx))


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W) uint8
    masks: np.ndarray  # (T, B, H, W) bool, one channel per object
    values: list[int]


def sample_clip(
    study: Study, length: int, max_objects: int, rng: np.random.Generator, p_cross_end: float = 0.0
) -> Clip | None:
    """Consecutive slices starting on a slice that shows the chosen objects (possibly in reverse order).

    With probability ``p_cross_end`` the clip starts close to where one object ends in the direction of travel
    and runs past it: the slices after the end teach the object score that objects end, which uniform starts
    rarely do for long objects (and which the propagation's stop rule reads).
    """
    if not study.extents:
        return None
    reverse = bool(rng.random() < 0.5)
    n = study.frames.shape[0]
    # objects that end inside the volume in the direction of travel (else "past the end" is off the volume)
    ending = [v for v, (first, last) in study.extents.items() if (first > 0 if reverse else last < n - 1)]
    if length > 1 and ending and rng.random() < p_cross_end:
        first, last = study.extents[int(rng.choice(sorted(ending)))]
        lo, hi = (first, min(first + length - 2, last)) if reverse else (max(last - length + 2, first), last)
        start = int(rng.integers(lo, hi + 1))
    else:
        labelled = np.nonzero(study.label.reshape(n, -1).any(axis=1))[0]
        start = int(rng.choice(labelled))
    idx = np.arange(start, start - length, -1) if reverse else np.arange(start, start + length)
    idx = idx[(idx >= 0) & (idx < n)]
    values = [int(v) for v in np.unique(study.label[start]) if v != 0]
    if not values:  # an object with a gap at the chosen slice
        return None
    rng.shuffle(values)
    values = values[:max_objects]
    masks = np.stack([study.label[idx] == v for v in values], axis=1)
    return Clip(study.frames[idx], masks, values)


def _box_of(mask: np.ndarray, rng: np.random.Generator, jitter: float = 0.1) -> list[float]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    noise = rng.normal(0, jitter, 4) * np.array([w, h, w, h])
    box = np.array([x0, y0, x1, y1], dtype=np.float64) + noise
    H, W = mask.shape
    return [
        float(np.clip(box[0], 0, W - 1)),
        float(np.clip(box[1], 0, H - 1)),
        float(np.clip(box[2], 0, W - 1)),
        float(np.clip(box[3], 0, H - 1)),
    ]


def _click_in(region: np.ndarray, rng: np.random.Generator) -> tuple[float, float] | None:
    ys, xs = np.nonzero(region)
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    return float(xs[i]), float(ys[i])


def simulate_prompts(masks0: np.ndarray, settings: TrainSettings, rng: np.random.Generator, image_size: int):
    """Per object on the first slice: a jittered box, 1-3 clicks, or the mask itself (as SAM2 trains)."""
    b, h, w = masks0.shape
    if rng.random() < settings.p_mask:
        return None, torch.from_numpy(masks0[:, None].astype(np.float32))
    use_box = rng.random() < settings.p_box
    coords, labels = [], []
    for obj in range(b):
        pts, lab = [], []
        if use_box:
            x0, y0, x1, y1 = _box_of(masks0[obj], rng)
            pts += [(x0, y0), (x1, y1)]
            lab += [2, 3]
        else:
            for _ in range(int(rng.integers(1, 4))):
                fg = rng.random() < 0.8
                p = _click_in(masks0[obj] if fg else ~masks0[obj], rng)
                if p is not None:
                    pts.append(p)
                    lab.append(1 if fg else 0)
            if 1 not in lab:
                pts.append(_click_in(masks0[obj], rng))  # type: ignore[arg-type]
                lab.append(1)
        coords.append(pts)
        labels.append(lab)
    width = max(len(p) for p in coords)
    pc = torch.zeros(b, width, 2)
    pl = torch.full((b, width), -1, dtype=torch.int32)  # -1: padding, ignored by SAM's prompt encoder
    for obj in range(b):
        pc[obj, : len(coords[obj])] = torch.tensor(coords[obj], dtype=torch.float32)
        pl[obj, : len(labels[obj])] = torch.tensor(labels[obj], dtype=torch.int32)
    pc = pc / torch.tensor([w, h], dtype=torch.float32) * image_size
    return {"point_coords": pc, "point_labels": pl}, None


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


def frame_loss(
    multimask_logits: torch.Tensor,
    ious: torch.Tensor,
    object_score_logits: torch.Tensor,
    target: torch.Tensor,
    kind: str,
) -> torch.Tensor:
    """SAM2's loss on one frame: the best of the candidate masks gets focal x20 + Dice + IoU L1; the object
    score gets BCE. Objects absent from the frame only train the object score. ``dice_ce``: Dice + CE."""
    target = target.expand_as(multimask_logits).float()
    present = (target.flatten(1).amax(-1) > 0).float()  # (B,)
    score_loss = F.binary_cross_entropy_with_logits(object_score_logits[:, 0].float(), present)
    if kind == "dice_ce":
        ce = F.binary_cross_entropy_with_logits(multimask_logits, target, reduction="none").flatten(2).mean(-1)
        per_mask = ce + _dice_loss(multimask_logits, target)
        best = per_mask.min(dim=1).values
        return (best * present).sum() / present.sum().clamp(min=1) + score_loss
    focal = _focal(multimask_logits, target)
    dice = _dice_loss(multimask_logits, target)
    combo = 20 * focal + dice
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


def configure_trainable(model: torch.nn.Module, parts: str) -> list[dict]:
    """Freeze what ``parts`` excludes; parameter groups with MedSAM2's learning rates."""
    frozen = TRAIN_PARTS[parts]
    encoder, rest = [], []
    for name, p in model.named_parameters():
        trainable = not any(name.startswith(f + ".") for f in frozen)
        p.requires_grad_(trainable)
        if trainable:
            (encoder if name.startswith("image_encoder.") else rest).append(p)
    return [g for g in ({"params": encoder, "name": "image_encoder"}, {"params": rest, "name": "rest"}) if g["params"]]


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
        _, feats, pos, sizes = model._prepare_backbone_features(backbone)
    output_dict: dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    total = torch.zeros((), device=device)
    for t in range(t_len):
        f_t = [x[:, t : t + 1].expand(-1, b, -1) for x in feats]
        p_t = [x[:, t : t + 1].expand(-1, b, -1) for x in pos]
        cond = t == 0
        with autocast:
            out, sam, _, _ = model._track_step(
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
                point_inputs = _add_correction(point_inputs, high.detach(), gt[t], rng)
                out, sam, _, _ = model._track_step(
                    t, cond, f_t, p_t, sizes, point_inputs, None, output_dict, t_len, False, low.detach()
                )
                _, high_multi, ious, low, high, obj_ptr, score = sam
            out.update(pred_masks=low, pred_masks_high_res=high, obj_ptr=obj_ptr, object_score_logits=score)
            model._encode_memory_in_output(f_t, sizes, point_inputs if cond else None, True, high, score, out)
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


def _add_correction(point_inputs: dict, pred_high: torch.Tensor, gt: torch.Tensor, rng: np.random.Generator) -> dict:
    pred = (pred_high[:, 0] > 0).cpu().numpy()
    target = (gt > 0).cpu().numpy()
    coords, labels = [], []
    for obj in range(pred.shape[0]):
        fn, fp = target[obj] & ~pred[obj], pred[obj] & ~target[obj]
        use_fn = fn.sum() >= fp.sum()
        click = _click_in(fn if use_fn else fp, rng)
        coords.append(click if click is not None else (0.0, 0.0))
        labels.append((1 if use_fn else 0) if click is not None else -1)
    dev = point_inputs["point_coords"].device
    pc = torch.cat([point_inputs["point_coords"], torch.tensor(coords, device=dev)[:, None]], dim=1)
    pl = torch.cat([point_inputs["point_labels"], torch.tensor(labels, dtype=torch.int32, device=dev)[:, None]], dim=1)
    return {"point_coords": pc, "point_labels": pl}


def key_slice_prompts(label: np.ndarray) -> list[KeySlicePrompt]:
    """What an annotator would draw: per label value, a tight box on the slice with the largest area."""
    prompts = []
    for value in (int(v) for v in np.unique(label) if v != 0):
        mask = label == value
        areas = mask.reshape(mask.shape[0], -1).sum(1)
        k = int(areas.argmax())
        ys, xs = np.nonzero(mask[k])
        box = (float(xs.min()), float(ys.min()), float(max(xs.max(), xs.min() + 1)), float(max(ys.max(), ys.min() + 1)))
        prompts.append(KeySlicePrompt(str(value), value, k, box=box))
    return prompts


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, gt).sum() / total)


def nsd_score(pred: np.ndarray, gt: np.ndarray, spacing_kji: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice (MONAI's implementation) at ``tolerance_mm``."""
    from monai.metrics import compute_surface_dice

    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    p = torch.from_numpy(np.stack([~pred, pred]))[None].float()
    g = torch.from_numpy(np.stack([~gt, gt]))[None].float()
    value = compute_surface_dice(p, g, [tolerance_mm], include_background=False, spacing=list(spacing_kji))
    return float(value.nan_to_num(0.0).mean())


@torch.inference_mode()
def evaluate(model, studies: Sequence[Study], device, compute_dtype, tolerance_mm: float) -> dict:
    """Propagated Dice/NSD per label value, prompted with a box on each object's largest slice."""
    was_training = model.training
    model.eval()
    per_label: dict[str, list[tuple[float, float]]] = {}
    try:
        for study in studies:
            prompts = key_slice_prompts(study.label)
            if not prompts:
                continue
            session = VolumeSession(study.frames, model, device, compute_dtype, compute_dtype or torch.float32)
            result = propagate_volume(session, prompts)
            for p in prompts:
                pred = result.binary_mask(p.label)
                gt = study.label == p.label_value
                nsd = nsd_score(pred, gt, study.spacing_kji, tolerance_mm)
                per_label.setdefault(p.label, []).append((dice_score(pred, gt), nsd))
    finally:
        model.train(was_training)
    summary = {
        k: {"dice": float(np.mean([d for d, _ in v])), "nsd": float(np.mean([n for _, n in v]))}
        for k, v in per_label.items()
    }
    all_scores = [s for v in per_label.values() for s in v]
    return {
        "dice": float(np.mean([d for d, _ in all_scores])) if all_scores else 0.0,
        "nsd": float(np.mean([n for _, n in all_scores])) if all_scores else 0.0,
        "per_label": summary,
    }


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    val_dice: float
    val_nsd: float
    per_label: dict
    seconds: float
    slices_per_second: float
    best: bool


@dataclass
class TrainResult:
    initial: dict
    epochs: list[EpochReport] = field(default_factory=list)
    best_dice: float = -1.0
    best_epoch: int = -1
    published: bool = False

    def as_json(self) -> dict:
        return {**asdict(self)}


def train(
    model: torch.nn.Module,
    train_studies: Sequence[Study],
    val_studies: Sequence[Study],
    settings: TrainSettings,
    device: torch.device,
    compute_dtype: torch.dtype | None,
    publish: Callable[[torch.nn.Module, EpochReport], None],
    on_epoch: Callable[[EpochReport, TrainResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    distributed: DistributedContext | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place; ``publish`` is called with the model whenever validation Dice improves.

    ``distributed``: this process is one rank of an initialised process group (see :mod:`lib.training.distributed`).
    Each rank samples its own clips (seed + rank), an epoch's ``steps_per_epoch`` clips are split across the
    ranks (rounded up to a multiple of the world size), DDP averages the gradients, and a stop requested on any
    rank stops all of them. Only rank 0 validates, publishes and calls ``on_epoch``; its epoch reports carry
    the loss averaged over all ranks and the slices/s of the whole group.
    """
    rank, world_size = (distributed.rank, distributed.world_size) if distributed else (0, 1)
    lead = rank == 0
    rng = np.random.default_rng(settings.seed + rank)
    torch.manual_seed(settings.seed + rank)
    groups = configure_trainable(model, settings.train_parts)
    for g in groups:
        g["lr"] = settings.lr_image_encoder if g["name"] == "image_encoder" else settings.lr
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    steps = math.ceil((settings.steps_per_epoch or max(4 * len(train_studies), 1)) / world_size)
    total_steps = steps * settings.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    autocast = autocast_for(device, compute_dtype)
    usable = [s for s in train_studies if s.label.any()]
    if not usable:
        raise ValueError("none of the training studies has a labelled voxel")
    result = TrainResult(initial={})
    if lead:
        result.initial = evaluate(model, val_studies, device, compute_dtype, settings.nsd_tolerance_mm)
        result.best_dice = result.initial["dice"]
        logger.info("validation before training: Dice %.4f NSD %.4f", result.initial["dice"], result.initial["nsd"])
    step_loss: torch.nn.Module = ClipLoss(model, settings, device, autocast)
    if distributed:
        # Frozen parameters (requires_grad False) are ignored by DDP; among the trainable ones some get no
        # gradient in a given step (e.g. the box-corner embeddings in a clicks-only step): find them each step.
        # The buffers never change during training: synced once at the start, not before every forward.
        step_loss = torch.nn.parallel.DistributedDataParallel(
            step_loss, find_unused_parameters=True, forward_sync_buffers=False
        )
    for epoch in range(1, settings.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        losses, slices = [], 0
        for _ in range(steps):
            stop = bool(should_stop and should_stop())
            if distributed:
                stop = any_rank(stop, device)
            if stop:
                return result
            clip = None
            while clip is None:
                clip = sample_clip(
                    usable[int(rng.integers(len(usable)))],
                    settings.clip_length,
                    settings.max_objects,
                    rng,
                    settings.p_cross_end,
                )
            loss = step_loss(clip, rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], settings.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            slices += clip.frames.shape[0]
        train_seconds = time.perf_counter() - t0
        loss_sum, n_losses = float(np.sum(losses)), len(losses)
        if distributed:
            loss_sum, n_losses, slices = sum_over_ranks([loss_sum, n_losses, slices], device)
        if not lead:
            continue
        scores = evaluate(model, val_studies, device, compute_dtype, settings.nsd_tolerance_mm)
        improved = scores["dice"] > result.best_dice
        report = EpochReport(
            epoch,
            loss_sum / max(n_losses, 1),
            scores["dice"],
            scores["nsd"],
            scores["per_label"],
            round(time.perf_counter() - t0, 3),
            round(slices / max(train_seconds, 1e-9), 2),
            improved,
        )
        result.epochs.append(report)
        if improved:
            result.best_dice, result.best_epoch = scores["dice"], epoch
            publish(model, report)
            result.published = True
        logger.info(
            "epoch %d/%d loss %.4f val Dice %.4f NSD %.4f (%.1f slices/s)%s",
            epoch,
            settings.epochs,
            report.train_loss,
            report.val_dice,
            report.val_nsd,
            report.slices_per_second,
            " [published]" if improved else "",
        )
        if on_epoch:
            on_epoch(report, result)
    return result
