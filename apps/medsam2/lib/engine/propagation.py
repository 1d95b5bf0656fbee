"""Key-slice segmentation and 3D propagation with SAM2's own model code (``SAM2Base.track_step``).

Semantics follow MedSAM2: each label's key-slice prompts give masks on those slices; the masks are
propagated forward from the first key slice and backward from the last one (two independent
passes, each seeded only by the key slices), and a slice's mask is the OR of the two passes.

What differs from the stock predictor is only how the work is scheduled:
- every slice is encoded once (in batches) for all labels and cached in the :class:`VolumeSession`;
- all labels and both directions advance together as one batch: a pass is indexed by its step from
  the key slice, and passes whose key slices sit at the same steps share one memory bank layout, so
  one ``track_step`` call serves all of them (this is exact, not an approximation);
- masks stay as low-resolution logits on the device and are upsampled and copied to the host once.
Overlaps between labels: a voxel goes to the label with the highest mask logit among those > 0.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lib.engine import sam2_api
from lib.engine.cpu_inference import uses_cpu_inference_modules
from lib.engine.mask_prompts import apply_edits
from lib.engine.precision import autocast_for
from lib.engine.prompts import KeySlicePrompt
from lib.engine.roi import Window, crop_output, margin_cells, model_view, rectangles_supported, window_around
from lib.engine.static_tracking import StaticTracker, borrowed_tracker, static_tracking_supported
from lib.engine.volume_session import VolumeSession
from lib.errors import CropUnavailable


def _empty_output_dict() -> dict:
    return {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}


def point_inputs_for(prompt: KeySlicePrompt, rows: int, cols: int, image_size: int, device) -> dict | None:
    """SAM2 point inputs: box corners (labels 2, 3) first, then clicks, scaled to the model's input size (None
    without either: SAM2 then decodes from its mask input alone)."""
    coords: list[tuple[float, float]] = []
    labels: list[int] = []
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        coords += [(x0, y0), (x1, y1)]
        labels += [2, 3]
    coords += list(prompt.points)
    labels += list(prompt.point_labels)
    if not coords:
        return None
    pts = torch.tensor(coords, dtype=torch.float32).view(1, -1, 2)
    pts = pts / torch.tensor([cols, rows], dtype=torch.float32) * image_size
    return {
        "point_coords": pts.to(device),
        "point_labels": torch.tensor(labels, dtype=torch.int32).view(1, -1).to(device),
    }


def mask_inputs_for(mask: np.ndarray, image_size: int, device) -> torch.Tensor:
    """A (rows, cols) bool mask as SAM2's mask prompt, resized to the model's input as ``add_new_mask`` does."""
    orig = torch.from_numpy(np.ascontiguousarray(mask)).to(device=device, dtype=torch.float32)[None, None]
    if orig.shape[-2:] == (image_size, image_size):
        return orig
    resized = F.interpolate(orig, size=(image_size, image_size), align_corners=False, mode="bilinear", antialias=True)
    return (resized >= 0.5).float()


def mask_logits_for(mask: np.ndarray, device) -> torch.Tensor:
    """A (rows, cols) bool mask as the previous-mask logits SAM2's decoder refines (+10 inside, -10 outside)."""
    return torch.from_numpy(np.where(mask, 10.0, -10.0).astype(np.float32)).to(device)[None, None]


def _compact(model, out: dict) -> dict:
    """The parts of a step's output that later steps need, as the stock predictor keeps them."""
    pred = sam2_api.fill_small_holes(model, out["pred_masks"])
    mem = out.get("maskmem_features")
    return {
        "maskmem_features": mem.to(torch.bfloat16) if mem is not None else None,
        "maskmem_pos_enc": out.get("maskmem_pos_enc"),
        "pred_masks": pred,
        "obj_ptr": out["obj_ptr"],
        "object_score_logits": out["object_score_logits"],
        "iou": out["iou"],
    }


def _select(out: dict, positions: torch.Tensor) -> dict:
    sel = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            sel[key] = value.index_select(0, positions.to(value.device))
        elif isinstance(value, list):
            sel[key] = [v.index_select(0, positions.to(v.device)) for v in value]
        else:
            sel[key] = value
    return sel


def _cat(outs: Sequence[dict]) -> dict:
    cat = {}
    for key in outs[0]:
        values = [o[key] for o in outs]
        if isinstance(values[0], torch.Tensor):
            cat[key] = torch.cat(values)
        elif isinstance(values[0], list):
            cat[key] = [torch.cat(parts) for parts in zip(*values, strict=False)]
        else:
            cat[key] = values[0]
    return cat


@torch.inference_mode()
def segment_key_slice(
    session: VolumeSession,
    prompt: KeySlicePrompt,
    encode_memory: bool = False,
    prev_mask_logits: torch.Tensor | None = None,
) -> dict:
    """SAM2 on one slice from its prompt: the conditioning-frame output (low-res logits in ``pred_masks``).

    A box, clicks or a prior mask are decoded by SAM2 (the prior, or ``prev_mask_logits``, as the previous mask
    they refine); a mask prompt alone, or the decoded mask with the prompt's lasso edits applied, is taken as the
    slice's mask as SAM2's ``add_new_mask`` does. With ``encode_memory`` the output also carries the memory
    features that propagation starts from, computed as the stock predictor does when propagation begins.
    """
    _, rows, cols = session.frames.shape
    with autocast_for(session.device, session.compute_dtype):
        feats = session.features([prompt.slice_index])
        mask = prompt.mask
        if prompt.has_clicks_or_box() or prompt.mask_is_prior:
            prior = mask_logits_for(mask, session.device) if mask is not None else prev_mask_logits
            points = point_inputs_for(prompt, rows, cols, session.image_size, session.device)
            if points is None:  # a prior mask alone: SAM2's own "no point" padding (label -1), as its predictors use
                points = {
                    "point_coords": torch.zeros(1, 1, 2, device=session.device),
                    "point_labels": -torch.ones(1, 1, dtype=torch.int32, device=session.device),
                }
            compact = _key_slice_step(session, prompt, feats, points=points, prior=prior)
            if prompt.edits is None:
                return _with_memory(session, feats, compact) if encode_memory else compact
            mask = (upsample_logits(compact["pred_masks"], rows, cols)[0] > 0).cpu().numpy()
        if mask is None:
            mask = np.zeros((rows, cols), dtype=bool)
        mask = apply_edits(mask, prompt.edits)
        compact = _key_slice_step(
            session, prompt, feats, masks=mask_inputs_for(mask, session.image_size, session.device)
        )
        return _with_memory(session, feats, compact) if encode_memory else compact


def _key_slice_step(session: VolumeSession, prompt: KeySlicePrompt, feats, points=None, prior=None, masks=None) -> dict:
    """SAM2's ``track_step`` on a key slice (no memory): from points (and a prior mask), or a mask prompt."""
    out = sam2_api.track_step_with_iou(
        session.model,
        frame_idx=prompt.slice_index,
        is_init_cond_frame=True,
        current_vision_feats=feats.vision_feats,
        current_vision_pos_embeds=feats.vision_pos_embeds,
        feat_sizes=feats.feat_sizes,
        point_inputs=points,
        mask_inputs=masks,
        num_frames=session.num_slices,
        track_in_reverse=False,
        run_mem_encoder=False,
        prev_sam_mask_logits=prior,
        output_dict=_empty_output_dict(),
    )
    return _compact(session.model, out)


def _with_memory(session: VolumeSession, feats, compact: dict) -> dict:
    """The key slice's memory, encoded from its upsampled low-res mask as the stock predictor does."""
    high_res = F.interpolate(
        compact["pred_masks"].float(),
        size=(session.image_size, session.image_size),
        mode="bilinear",
        align_corners=False,
    )
    mem, mem_pos = sam2_api.encode_new_memory(
        session.model,
        current_vision_feats=feats.vision_feats,
        feat_sizes=feats.feat_sizes,
        pred_masks_high_res=high_res,
        object_score_logits=compact["object_score_logits"],
        is_mask_from_pts=True,
    )
    compact["maskmem_features"] = mem.to(torch.bfloat16)
    compact["maskmem_pos_enc"] = mem_pos
    return compact


def compose_labels(lowres: torch.Tensor, values: Sequence[int], rows: int, cols: int) -> np.ndarray:
    """The overlap rule: (F, L, h, w) per-label low-res logits -> (F, rows, cols) uint8 label values, each
    voxel to the label with the highest upsampled logit among those > 0."""
    up = F.interpolate(lowres.float(), size=(rows, cols), mode="bilinear", align_corners=False)
    # a running maximum over the few labels: 2-5x faster on the CPU than max(dim=1) with a lookup table; ties go
    # to the first label, as max(dim=1) gives them
    best = up[:, 0]
    winner = torch.full(best.shape, int(values[0]), dtype=torch.uint8, device=best.device)
    for index, value in enumerate(values[1:], start=1):
        candidate = up[:, index]
        winner.masked_fill_(candidate > best, int(value))
        best = torch.maximum(best, candidate)
    winner.masked_fill_(best <= 0, 0)
    return winner.cpu().numpy()


def upsample_logits(lowres: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, 1, h, w) logits -> (B, rows, cols) float32, as the stock predictor resizes to video size."""
    return F.interpolate(lowres.float(), size=(rows, cols), mode="bilinear", align_corners=False)[:, 0]


@dataclass
class _Pass:
    """One label's propagation in one direction, indexed by step from its origin slice."""

    label: str
    sign: int  # +1 forward (increasing slice index), -1 backward
    origin: int
    length: int  # last step (inclusive)
    cond: dict[int, dict]  # step -> conditioning output (batch 1)
    unchecked: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, object score) for the rule
    low_run: int = 0  # consecutive slices with a low object score so far

    def frame(self, step: int) -> int:
        return self.origin + self.sign * step


@dataclass(frozen=True)
class StopRule:
    """End a propagation pass once SAM2's object score stays below ``min_object_score`` (a logit: 0 is
    probability 0.5) for ``patience`` consecutive slices past the label's last key slice in that direction;
    those slices and the rest of the volume that way stay empty for the label."""

    min_object_score: float = 0.0
    patience: int = 3

    def __post_init__(self):
        if self.patience < 1:
            raise ValueError("the stop rule's patience must be at least 1 slice")

    @classmethod
    def from_text(cls, text: str) -> StopRule | None:
        """``off``, ``on`` (the defaults above) or ``<min object score>,<patience>`` such as ``0,3``."""
        value = text.strip().lower()
        if value in ("off", "false", "0", "no", ""):
            return None
        if value in ("on", "true", "1", "yes"):
            return cls()
        try:
            score, patience = value.split(",")
            return cls(float(score), int(patience))
        except ValueError:
            raise ValueError(f"stop_rule must be off, on or '<min object score>,<patience>', got {text!r}") from None


@dataclass(frozen=True)
class TrackingOptions:
    """How tracking runs (``--conf``: tracking_region, tracking_margin, max_key_slices, tracking_workers).

    ``region``: ``roi`` tracks each label on a window of the cached features around its key-slice masks plus
    ``margin`` (a fraction of the frame's side, at least one feature cell), grown by twice the margin, then the
    whole frame, whenever a mask reaches the window's border (see :mod:`lib.engine.roi`); ``full`` tracks the whole
    frame (the reference). ``strict``: the request itself asked for ``roi``, so a key slice with an empty mask is
    refused (:class:`lib.errors.CropUnavailable`) instead of tracked on the whole frame. ``max_key_slices``: key
    slices a tracked slice attends to, the nearest ones (0: all). ``workers``: 2 runs passes (the two directions,
    the labels) on two threads of one core each. ``keep_memory``: keep each tracked slice's memory in the result
    for :func:`correct_locally`."""

    region: str = "full"
    margin: float = 0.125
    max_key_slices: int = 0
    workers: int = 1
    keep_memory: bool = False
    strict: bool = False
    overflow: str = "grow"  # "clip": keep the window, masks cut at its border (benches with random weights)

    def __post_init__(self):
        if self.overflow not in ("grow", "clip"):
            raise ValueError(f"tracking overflow must be grow or clip, got {self.overflow!r}")
        if self.region not in ("roi", "full"):
            raise ValueError(f"tracking region must be roi or full, got {self.region!r}")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"the tracking margin is a fraction of the frame's side (0 to 1), got {self.margin}")


@dataclass(frozen=True)
class CorrectionRule:
    """A local correction re-tracks outward from the corrected slice and stops, in each direction, once its masks
    agree with the previous answer (Dice >= ``min_dice`` on the low-res masks, both empty counting as agreeing)
    over ``slices`` consecutive slices; beyond, the previous answer is kept."""

    slices: int = 3
    min_dice: float = 0.9

    def __post_init__(self):
        if self.slices < 1 or not 0 < self.min_dice <= 1:
            raise ValueError("a correction rule needs at least 1 slice and a Dice in (0, 1]")

    @classmethod
    def from_text(cls, text: str) -> CorrectionRule | None:
        """``off``, ``on`` (the defaults above) or ``<slices>,<min Dice>`` such as ``3,0.9``."""
        value = text.strip().lower()
        if value in ("off", "false", "0", "no", ""):
            return None
        if value in ("on", "true", "1", "yes"):
            return cls()
        try:
            slices, dice = value.split(",")
            return cls(int(slices), float(dice))
        except ValueError:
            raise ValueError(f"local_corrections must be off, on or '<slices>,<min Dice>', got {text!r}") from None


@dataclass
class TrackMemory:
    """What a local correction reuses from an answer: per label its key slices' outputs (whole frame), and per
    (label, direction) the window tracked (None: the whole frame) and each tracked slice's memory and object
    pointer (in that window)."""

    key_outputs: dict[str, dict[int, dict]] = field(default_factory=dict)
    windows: dict[tuple[str, int], Window | None] = field(default_factory=dict)
    slices: dict[tuple[str, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(
            m.numel() * m.element_size() + p.numel() * p.element_size()
            for per in self.slices.values()
            for m, p in per.values()
        )

    def for_labels(self, names: Sequence[str]) -> TrackMemory:
        keep = set(names)
        return TrackMemory(
            {k: v for k, v in self.key_outputs.items() if k in keep},
            {k: v for k, v in self.windows.items() if k[0] in keep},
            {k: v for k, v in self.slices.items() if k[0] in keep},
        )


def _prev_mask(mask_inputs: dict | None, prompt: KeySlicePrompt, device) -> torch.Tensor | None:
    if not mask_inputs or (prompt.label, prompt.slice_index) not in mask_inputs:
        return None
    logits = mask_inputs[(prompt.label, prompt.slice_index)].float().to(device)
    return logits.clamp(-32.0, 32.0)[None, None]  # SAM2's demo clamps a previous mask the same way


@dataclass
class PropagationResult:
    """Low-resolution logits per label per slice, SAM2's per-slice signals, and what was done and how fast."""

    logits: dict[str, dict[int, torch.Tensor]]  # label -> slice -> (h, w) logits
    object_scores: dict[str, dict[int, float]]  # label -> slice -> object score logit
    predicted_iou: dict[str, dict[int, float]]  # label -> slice -> SAM2's predicted IoU of its mask
    label_values: dict[str, int]
    key_slices: dict[str, list[int]]
    stopped: dict[str, dict[str, int]]  # label -> direction -> first slice left empty by the stop rule
    rows: int
    cols: int
    num_slices: int
    latencies: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    static_steps: int = 0
    memory: TrackMemory | None = None  # kept for local corrections (TrackingOptions.keep_memory)
    tracking: dict = field(default_factory=dict)  # how it was tracked: region, windows, regrown, local

    def with_labels_from(self, other: PropagationResult, names: Sequence[str]) -> PropagationResult:
        """This result plus ``other``'s answer for the labels ``names`` (labels this run did not propagate)."""

        def merged(mine: dict, theirs: dict) -> dict:
            return {**mine, **{n: theirs[n] for n in names if n in theirs}}

        memory = None
        if self.memory is not None and other.memory is not None:
            theirs = other.memory.for_labels(names)
            memory = TrackMemory(
                {**self.memory.key_outputs, **theirs.key_outputs},
                {**self.memory.windows, **theirs.windows},
                {**self.memory.slices, **theirs.slices},
            )
        return dataclasses.replace(
            self,
            memory=memory,
            logits=merged(self.logits, other.logits),
            object_scores=merged(self.object_scores, other.object_scores),
            predicted_iou=merged(self.predicted_iou, other.predicted_iou),
            label_values=merged(self.label_values, other.label_values),
            key_slices=merged(self.key_slices, other.key_slices),
            stopped=merged(self.stopped, other.stopped),
        )

    def binary_mask(self, label: str, chunk: int = 32) -> np.ndarray:
        """(num_slices, rows, cols) bool mask of one label (before the overlap rule)."""
        out = np.zeros((self.num_slices, self.rows, self.cols), dtype=bool)
        frames = self._frames_with_mask([label])
        for start in range(0, len(frames), chunk):
            part = frames[start : start + chunk]
            logits = torch.stack([self.logits[label][f] for f in part]).unsqueeze(1)
            out[part] = (upsample_logits(logits, self.rows, self.cols) > 0).cpu().numpy()
        return out

    def label_frames(self, chunk: int = 16) -> np.ndarray:
        """(num_slices, rows, cols) uint8: every label's value where it wins (highest logit > 0)."""
        out = np.zeros((self.num_slices, self.rows, self.cols), dtype=np.uint8)
        labels = list(self.logits)
        frames = self._frames_with_mask(labels)
        values = [self.label_values[n] for n in labels]
        for start in range(0, len(frames), chunk):
            part = frames[start : start + chunk]
            stacked = []
            for name in labels:
                per = self.logits[name]
                ref = next(iter(per.values()))
                stacked.append(torch.stack([per.get(f, torch.full_like(ref, -1e4)) for f in part]))
            out[part] = compose_labels(torch.stack(stacked, dim=1), values, self.rows, self.cols)
        return out

    def _frames_with_mask(self, labels: Sequence[str]) -> list[int]:
        """The slices where any of ``labels`` has a logit > 0: elsewhere bilinear upsampling (a convex combination
        of logits <= 0) gives nothing, so those slices stay empty without being upsampled."""
        return sorted({f for n in labels for f, lg in self.logits.get(n, {}).items() if bool((lg > 0).any())})

    def coverage(self) -> dict[str, dict]:
        """Per label: slices propagated and slices with a non-empty mask (low-res logits > 0)."""
        cov = {}
        for name, per in self.logits.items():
            nonempty = sorted(f for f, lg in per.items() if bool((lg > 0).any()))
            cov[name] = {
                "slices_propagated": [min(per), max(per)] if per else None,
                "num_slices_propagated": len(per),
                "slices_with_mask": [nonempty[0], nonempty[-1]] if nonempty else None,
                "num_slices_with_mask": len(nonempty),
                "stopped_at": dict(self.stopped.get(name, {})),
            }
        return cov


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Tracks:
    """What the passes returned, per label and slice, within ``lo..hi``; and where the stop rule ended them."""

    lo: int
    hi: int
    stop_rule: StopRule | None
    labels: Sequence[str]
    logits: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    scores: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    ious: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    stopped: dict[str, dict[str, int]] = field(default_factory=dict)
    keep_memory: bool = False
    memories: dict[tuple[str, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    windows: dict[tuple[str, int], Window | None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for per in (self.logits, self.scores, self.ious, self.stopped):
            per.update({name: {} for name in self.labels})

    def fresh(self, labels: Sequence[str]) -> _Tracks:
        """An empty record for some labels, with the same range and rules (one group's run)."""
        return _Tracks(self.lo, self.hi, self.stop_rule, list(labels), keep_memory=self.keep_memory)

    def record(
        self,
        step: int,
        batch: list[_Pass],
        masks: torch.Tensor,
        scores: torch.Tensor,
        ious: torch.Tensor,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Keep each pass's logits for its slice at ``step`` (the key slice: the max of both passes), and with
        ``keep_memory`` the step's memory and object pointer."""
        masks = masks.to(torch.float16)  # a copy: graph outputs are overwritten by the next replay
        scores = scores.float().clone()
        ious = ious.float().clone()
        for pos, p in enumerate(batch):
            frame = p.frame(step)
            if step > p.length or not (self.lo <= frame <= self.hi or step in p.cond):
                continue
            prev = self.logits[p.label].get(frame)
            self.logits[p.label][frame] = masks[pos, 0] if prev is None else torch.maximum(prev, masks[pos, 0])
            self.scores[p.label][frame] = scores[pos, 0]
            self.ious[p.label][frame] = ious[pos]
            if self.keep_memory and memory is not None:
                mem, ptr = memory
                per = self.memories.setdefault((p.label, p.sign), {})
                per[frame] = (mem[pos : pos + 1].to(torch.bfloat16).clone(), ptr[pos : pos + 1].float().clone())
            if self.stop_rule is not None and step > max(p.cond):
                p.unchecked.append((step, scores[pos, 0]))

    def merge(self, other: _Tracks, windows: dict[tuple[str, int], Window | None]) -> None:
        """Add one group's record (thread-safe: groups may run on two threads)."""
        with self.lock:
            for name, per in other.logits.items():
                mine = self.logits.setdefault(name, {})
                for frame, logits in per.items():
                    prev = mine.get(frame)
                    mine[frame] = logits if prev is None else torch.maximum(prev, logits)
            for attr in ("scores", "ious", "stopped"):
                for name, per in getattr(other, attr).items():
                    getattr(self, attr).setdefault(name, {}).update(per)
            self.memories.update(other.memories)
            self.windows.update(windows)

    def apply_stop_rule(self, batch: list[_Pass]) -> None:
        """End passes whose object score stayed low for ``patience`` slices; empty their slices from there on."""
        waiting = [p for p in batch if p.unchecked]
        if not waiting:
            return
        values = iter(torch.stack([v for p in waiting for _, v in p.unchecked]).cpu().tolist())
        for p in waiting:
            for step, _ in p.unchecked:
                low = next(values) < self.stop_rule.min_object_score
                if p.length >= step:
                    self._count_low(p, step, low)
            p.unchecked.clear()

    def _count_low(self, p: _Pass, step: int, low: bool) -> None:
        p.low_run = p.low_run + 1 if low else 0
        if p.low_run < self.stop_rule.patience:
            return
        first_empty = step - p.low_run + 1
        for s in range(first_empty, step + 1):
            for per in (self.logits, self.scores, self.ious):
                per[p.label].pop(p.frame(s), None)
        p.length = first_empty - 1
        self.stopped[p.label]["forward" if p.sign > 0 else "backward"] = p.frame(first_empty)


@dataclass
class _StepCount:
    """Tracking steps run (all, and on static buffers), when the first static step ended, windows regrown."""

    steps: int = 0
    static: int = 0
    first_static_done: float | None = None
    regrown: int = 0

    def add(self, other: _StepCount) -> None:
        self.steps += other.steps
        self.static += other.static
        self.regrown += other.regrown
        if other.first_static_done is not None:
            self.first_static_done = min(self.first_static_done or other.first_static_done, other.first_static_done)


class _CropOverflow(Exception):
    """A tracked mask reached the border of its window: the group is tracked again on a larger one."""


def _group_prompts(prompts: Sequence[KeySlicePrompt]) -> tuple[dict[str, list[KeySlicePrompt]], dict[str, int]]:
    by_label: dict[str, list[KeySlicePrompt]] = {}
    label_values: dict[str, int] = {}
    for p in prompts:
        by_label.setdefault(p.label, []).append(p)
        label_values[p.label] = p.label_value
    return by_label, label_values


def _conditioned_passes(
    session: VolumeSession,
    by_label: dict[str, list[KeySlicePrompt]],
    lo: int,
    hi: int,
    mask_inputs: dict[tuple[str, int], torch.Tensor] | None,
) -> tuple[list[_Pass], dict[str, dict[int, dict]]]:
    """Each label's key slices segmented, and its forward and backward pass seeded with them (per label: each
    prompt has its own number of points). Returns the passes and each label's key-slice outputs by slice."""
    passes: list[_Pass] = []
    keys: dict[str, dict[int, dict]] = {}
    for label, items in by_label.items():
        cond = {
            p.slice_index: segment_key_slice(
                session, p, encode_memory=True, prev_mask_logits=_prev_mask(mask_inputs, p, session.device)
            )
            for p in items
        }
        keys[label] = cond
        first, last = min(cond), max(cond)
        passes.append(_Pass(label, +1, first, max(hi, last) - first, {s - first: o for s, o in cond.items()}))
        passes.append(_Pass(label, -1, last, last - min(lo, first), {last - s: o for s, o in cond.items()}))
    return passes, keys


def _label_windows(
    session: VolumeSession, keys: dict[str, dict[int, dict]], tracking: TrackingOptions
) -> dict[str, Window | None]:
    """Each label's tracking window (None: the whole frame) around its key-slice masks."""
    if tracking.region != "roi":
        return {label: None for label in keys}
    grid = session.feat_sizes()[-1][0]
    margin = margin_cells(tracking.margin, grid)
    windows = {}
    for label, cond in keys.items():
        masks = [o["pred_masks"] for o in cond.values()]
        if tracking.strict and not any(bool((m > 0).any()) for m in masks):
            raise CropUnavailable(
                f"The mask of {label!r} on its key slice(s) {sorted(cond)} is empty, so no region of interest can "
                'be formed around it: draw a box around the object, or send "tracking_region": "full".'
            )
        windows[label] = window_around(masks, grid, margin, square=not rectangles_supported(session.model))
    return windows


def _stock_step(
    session: VolumeSession,
    od: dict,
    group: list[_Pass],
    active: list[int],
    step: int,
    horizon: int,
    view=None,
    window: Window | None = None,
):
    """One step of the passes ``active`` on SAM2's own ``track_step`` (memory read from ``od``), on the model or
    a view of it (:func:`lib.engine.roi.model_view`) with the features cut to its window."""
    frames = [group[a].frame(step) for a in active]
    return _track_frames(session, od, frames, step, horizon, view, window)


def _track_frames(session: VolumeSession, od: dict, frames: list[int], step: int, horizon: int, view, window):
    feats = session.features(frames, window=window)
    model = view if view is not None else session.model
    raw = sam2_api.track_step_with_iou(
        model,
        frame_idx=step,
        is_init_cond_frame=False,
        current_vision_feats=feats.vision_feats,
        current_vision_pos_embeds=feats.vision_pos_embeds,
        feat_sizes=feats.feat_sizes,
        point_inputs=None,
        mask_inputs=None,
        output_dict=od,
        num_frames=session.frames.shape[0],
        track_in_reverse=False,
        run_mem_encoder=True,
        prev_sam_mask_logits=None,
    )
    out = _compact(model, raw)
    od["non_cond_frame_outputs"][step] = out
    od["non_cond_frame_outputs"].pop(step - horizon, None)
    return out


def _open_static_tracker(
    session: VolumeSession, od: dict, group: list[_Pass], members: list[int], borrowed, window: Window | None
):
    """Static buffers (and CUDA graphs on a GPU) for passes from one key slice, seeded with its output."""
    frames = [group[a].frame(1) for a in members]
    feats = session.features(frames, window=window)
    return borrowed.enter_context(
        borrowed_tracker(
            model_view(session.model, window),
            session.frames.shape[0],
            od["cond_frame_outputs"][0],
            session.stacked(frames, window),
            feats.vision_pos_embeds,
            feats.feat_sizes,
            session.device,
            session.compute_dtype,
            use_graphs=session.device.type == "cuda",
        )
    )


def _static_step(
    session: VolumeSession,
    tracker: StaticTracker,
    group: list[_Pass],
    members: list[int],
    step: int,
    window: Window | None = None,
):
    """One step on the static tracker; returns the members still in its batch and the step's outputs."""
    if session.device.type != "cuda" and any(group[a].length < step for a in members):
        # on the CPU finished passes leave the batch; a GPU keeps shapes static for its graphs
        kept = [i for i, a in enumerate(members) if group[a].length >= step]
        tracker.keep(kept)
        members = [members[i] for i in kept]
    # finished passes (GPU) keep computing on their last slice; their output is dropped
    frames = [group[a].frame(min(step, group[a].length)) for a in members]
    session.gather(frames, tracker.levels, window)
    return members, tracker.step(step)


def _drop_finished(od: dict, group: list[_Pass], active: list[int], step: int) -> list[int]:
    """The passes of ``active`` still running at ``step``; the memory bank keeps only their rows."""
    still = [a for a in active if group[a].length >= step]
    if len(still) < len(active):
        keep = torch.tensor([active.index(a) for a in still], dtype=torch.long)
        for kind in od:
            od[kind] = {s: _select(o, keep) for s, o in od[kind].items()}
    return still


def _record(
    tracks: _Tracks,
    step: int,
    batch: list[_Pass],
    masks: torch.Tensor,
    scores: torch.Tensor,
    ious: torch.Tensor,
    memory,
    window: Window | None,
    grow: bool = True,
) -> None:
    """Record a tracked step, its masks put back on the whole frame; a mask at the window's border ends the run
    (``grow``; else the mask stays cut at the border)."""
    if window is not None:
        live = [i for i, p in enumerate(batch) if step <= p.length]
        if grow and live and bool(window.touches_border(masks[live]).any()):
            raise _CropOverflow()
        masks = window.paste(masks)
    tracks.record(step, batch, masks, scores, ious, memory)


def _run_group(
    session: VolumeSession,
    group: list[_Pass],
    cond_steps: frozenset,
    tracks: _Tracks,
    count: _StepCount,
    horizon: int,
    steady: bool,
    borrowed: ExitStack,
    window: Window | None = None,
    max_key_slices: int = 0,
    grow: bool = True,
) -> None:
    """Advance passes whose key slices sit at the same steps as one batch, step by step, to their ends (on the
    window's features when there is one)."""
    stop_rule = tracks.stop_rule
    # object scores are read on the host every few steps, not every step (a GPU would stall on each read)
    check_every = 1 if session.device.type != "cuda" or stop_rule is None else stop_rule.patience
    active = list(range(len(group)))
    full_cond = {s: _cat([p.cond[s] for p in group]) for s in sorted(cond_steps)}
    od = {
        "cond_frame_outputs": {s: crop_output(o, window) if window else o for s, o in full_cond.items()},
        "non_cond_frame_outputs": {},
    }
    static = steady and cond_steps == frozenset({0}) and static_tracking_supported(session.model)
    view = model_view(session.model, window, max_key_slices)
    tracker: StaticTracker | None = None
    members = list(active)
    for step in range(0, max(p.length for p in group) + 1):
        if stop_rule is not None and step % check_every == 0:
            tracks.apply_stop_rule(group)
        if all(p.length < step for p in group):
            break  # every pass has ended (the stop rule can end them early)
        if static and step >= 1:
            if tracker is None:
                tracker = _open_static_tracker(session, od, group, members, borrowed, window)
            members, (masks, scores, ious) = _static_step(session, tracker, group, members, step, window)
            if count.static == 0:
                _sync(session.device)
                count.first_static_done = time.perf_counter()
            count.steps += 1
            count.static += 1
            batch = [group[a] for a in members]
            _record(tracks, step, batch, masks, scores, ious, tracker.last_memory, window, grow)
            continue
        active = _drop_finished(od, group, active, step)
        if step in cond_steps:  # the key slice's own (whole-frame) output
            out = _select(full_cond[step], torch.tensor(active, dtype=torch.long))
            tracks.record(step, [group[a] for a in active], out["pred_masks"], out["object_score_logits"], out["iou"])
            continue
        out = _stock_step(session, od, group, active, step, horizon, view, window)
        count.steps += 1
        memory = (out["maskmem_features"], out["obj_ptr"])
        batch = [group[a] for a in active]
        _record(tracks, step, batch, out["pred_masks"], out["object_score_logits"], out["iou"], memory, window, grow)
    if stop_rule is not None:
        tracks.apply_stop_rule(group)


@dataclass
class _Group:
    """Passes tracked as one batch: the same key-slice steps, the same window."""

    passes: list[_Pass]
    cond_steps: frozenset
    window: Window | None


def _groups(passes: list[_Pass], windows: dict[str, Window | None], tracking: TrackingOptions) -> list[_Group]:
    """Passes whose key slices sit at the same steps and that track the same window share one batch; with two
    workers, the two directions are kept apart so that they can run at once."""
    groups: dict[tuple, _Group] = {}
    for p in passes:
        key = (frozenset(p.cond), windows.get(p.label), p.sign if tracking.workers > 1 else 0)
        groups.setdefault(key, _Group([], key[0], key[1])).passes.append(p)
    return list(groups.values())


def _track_group(
    session: VolumeSession,
    group: _Group,
    tracks: _Tracks,
    horizon: int,
    steady: bool,
    tracking: TrackingOptions,
) -> _StepCount:
    """Track one group to its end; where a mask reaches its window's border, again on a window grown by twice the
    margin, then on the whole frame. Its record is added to ``tracks`` once done."""
    count = _StepCount()
    window = group.window
    grow = 2 * margin_cells(tracking.margin, window.grid) if window is not None else 0
    while True:
        local = tracks.fresh({p.label for p in group.passes})
        attempt = [dataclasses.replace(p, unchecked=[], low_run=0) for p in group.passes]
        try:
            with ExitStack() as borrowed:
                _run_group(
                    session,
                    attempt,
                    group.cond_steps,
                    local,
                    count,
                    horizon,
                    steady,
                    borrowed,
                    window,
                    tracking.max_key_slices,
                    tracking.overflow == "grow",
                )
        except _CropOverflow:
            count.regrown += 1
            window = window.grown(grow) if window is not None else None
            continue
        tracks.merge(local, {(p.label, p.sign): window for p in group.passes})
        return count


def _run_groups(
    session: VolumeSession, groups: list[_Group], run: Callable[[_Group], _StepCount], workers: int
) -> _StepCount:
    """Every group tracked, on ``workers`` threads of one core each when there are several groups."""
    total = _StepCount()
    # SAM2's own attention modules rewrite their rotary frequencies per call: two threads only on the CPU modules
    if workers <= 1 or len(groups) < 2 or not uses_cpu_inference_modules(session.model):
        for group in groups:
            total.add(run(group))
        return total

    def one_thread(group: _Group) -> _StepCount:
        torch.set_num_threads(1)  # this thread's own OpenMP pool: the two workers share the two cores
        with torch.inference_mode(), autocast_for(session.device, session.compute_dtype):
            return run(group)

    # the longest first, so that the two threads end about together
    ordered = sorted(groups, key=lambda g: -max(p.length for p in g.passes))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medsam2-track") as pool:
        for count in pool.map(one_thread, ordered):
            total.add(count)
    return total


@torch.inference_mode()
def propagate_volume(
    session: VolumeSession,
    prompts: Sequence[KeySlicePrompt],
    slice_range: tuple[int, int] | None = None,
    memory_horizon: int | None = None,
    steady: bool = True,
    stop_rule: StopRule | None = None,
    mask_inputs: dict[tuple[str, int], torch.Tensor] | None = None,
    tracking: TrackingOptions | None = None,
) -> PropagationResult:
    """Segment every label's key slices and propagate them through ``slice_range`` (inclusive; default all).

    All labels and both directions run as batched ``track_step`` calls; see the module docstring.
    Passes from a single key slice run their steps from static buffers (``steady``), replayed as CUDA graphs
    on a GPU; ``steady=False`` keeps every step on the stock ``track_step`` path.
    ``stop_rule`` ends a pass where the object has ended (see :class:`StopRule`); ``mask_inputs`` gives a
    prompt's previous mask logits (h, w) by (label, slice), refined by its clicks as SAM2's demo does.
    ``tracking``: region of interest, key slices attended, workers (see :class:`TrackingOptions`; default: the
    whole frame, all key slices, one worker).
    """
    if not prompts:
        raise ValueError("no prompts")
    tracking = tracking or TrackingOptions()
    model = session.model
    n, rows, cols = session.frames.shape
    lo, hi = slice_range if slice_range is not None else (0, n - 1)
    lo, hi = max(0, lo), min(n - 1, hi)
    t0 = time.perf_counter()
    by_label, label_values = _group_prompts(prompts)
    key_slices = {p.slice_index for p in prompts}
    session.encode(range(min(lo, min(key_slices)), max(hi, max(key_slices)) + 1))  # before tracking starts
    _sync(session.device)
    t_encode = time.perf_counter()
    passes, keys = _conditioned_passes(session, by_label, lo, hi, mask_inputs)
    windows = _label_windows(session, keys, tracking)
    t_cond = time.perf_counter()

    tracks = _Tracks(lo, hi, stop_rule, list(by_label), keep_memory=tracking.keep_memory)
    horizon = memory_horizon or max(model.num_maskmem, model.max_obj_ptrs_in_encoder) + 1
    groups = _groups(passes, windows, tracking)
    with autocast_for(session.device, session.compute_dtype):
        count = _run_groups(
            session, groups, lambda g: _track_group(session, g, tracks, horizon, steady, tracking), tracking.workers
        )
    _sync(session.device)
    t_track = time.perf_counter()
    memory = TrackMemory(keys, dict(tracks.windows), tracks.memories) if tracking.keep_memory else None
    return PropagationResult(
        logits=tracks.logits,
        object_scores=_to_host(tracks.scores),
        predicted_iou=_to_host(tracks.ious),
        label_values=label_values,
        key_slices={name: sorted({p.slice_index for p in items}) for name, items in by_label.items()},
        stopped=tracks.stopped,
        rows=rows,
        cols=cols,
        num_slices=n,
        latencies=_latencies(t0, t_encode, t_cond, t_track, count.first_static_done),
        steps=count.steps,
        static_steps=count.static,
        memory=memory,
        tracking=_tracking_json(tracking, tracks.windows, count.regrown),
    )


def _tracking_json(tracking: TrackingOptions, windows: dict, regrown: int) -> dict:
    """How the answer was tracked, for the answer JSON: the region and, per label and direction, the window."""
    out = {"region": tracking.region, "workers": tracking.workers, "regrown": regrown}
    if tracking.region == "roi":
        out["windows"] = {
            f"{label}:{'forward' if sign > 0 else 'backward'}": (w.as_json() if w is not None else "full")
            for (label, sign), w in sorted(windows.items())
        }
    return out


def _latencies(t0: float, t_encode: float, t_cond: float, t_track: float, first_static: float | None) -> dict:
    latencies = {
        "encode": round(t_encode - t0, 4),
        "key_slices": round(t_cond - t_encode, 4),
        "track": round(t_track - t_cond, 4),
    }
    if first_static is not None:  # the first static step includes the buffers' set-up (and a graph capture on a GPU)
        latencies["track_first_static_step"] = round(first_static - t_cond, 4)
        latencies["track_other_steps"] = round(t_track - first_static, 4)
    return latencies


def _to_host(per_label: dict[str, dict[int, torch.Tensor]]) -> dict[str, dict[int, float]]:
    """Scalar tensors per label and slice -> floats, in one transfer per label."""
    out: dict[str, dict[int, float]] = {}
    for name, per in per_label.items():
        frames = sorted(per)
        values = torch.stack([per[f] for f in frames]).float().cpu().tolist() if frames else []
        out[name] = dict(zip(frames, values, strict=True))
    return out
