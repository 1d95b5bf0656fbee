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

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .prompts import KeySlicePrompt
from .steady_tracking import StaticTracker, borrowed_tracker, static_tracking_supported
from .volume_session import VolumeSession, autocast_for

try:  # SAM2's optional CUDA extension, used for its small-hole filling post-processing
    from sam2 import _C  # noqa: F401
    from sam2.utils.misc import fill_holes_in_mask_scores

    _HAS_SAM2_EXT = True
except ImportError:  # the stock predictor then skips the step too
    _HAS_SAM2_EXT = False


def _empty_output_dict() -> dict:
    return {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}


def point_inputs_for(prompt: KeySlicePrompt, rows: int, cols: int, image_size: int, device) -> dict:
    """SAM2 point inputs: box corners (labels 2, 3) first, then clicks, scaled to the model's input size."""
    coords: list[tuple[float, float]] = []
    labels: list[int] = []
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        coords += [(x0, y0), (x1, y1)]
        labels += [2, 3]
    coords += list(prompt.points)
    labels += list(prompt.point_labels)
    pts = torch.tensor(coords, dtype=torch.float32).view(1, -1, 2)
    pts = pts / torch.tensor([cols, rows], dtype=torch.float32) * image_size
    return {
        "point_coords": pts.to(device),
        "point_labels": torch.tensor(labels, dtype=torch.int32).view(1, -1).to(device),
    }


def _compact(model, out: dict) -> dict:
    """The parts of a step's output that later steps need, as the stock predictor keeps them."""
    pred = out["pred_masks"]
    if _HAS_SAM2_EXT and getattr(model, "fill_hole_area", 0) > 0:
        pred = fill_holes_in_mask_scores(pred, model.fill_hole_area)
    mem = out.get("maskmem_features")
    return {
        "maskmem_features": mem.to(torch.bfloat16) if mem is not None else None,
        "maskmem_pos_enc": out.get("maskmem_pos_enc"),
        "pred_masks": pred,
        "obj_ptr": out["obj_ptr"],
        "object_score_logits": out["object_score_logits"],
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
    """SAM2 on one slice from a box/clicks: the conditioning-frame output (low-res logits in ``pred_masks``).

    With ``encode_memory`` the output also carries the memory features that propagation starts from,
    computed as the stock predictor does when propagation begins (from the upsampled low-res mask).
    """
    model = session.model
    _, rows, cols = session.frames.shape
    with autocast_for(session.device, session.compute_dtype):
        feats = session.features([prompt.slice_index])
        out = model.track_step(
            frame_idx=prompt.slice_index,
            is_init_cond_frame=True,
            current_vision_feats=feats.vision_feats,
            current_vision_pos_embeds=feats.vision_pos_embeds,
            feat_sizes=feats.feat_sizes,
            point_inputs=point_inputs_for(prompt, rows, cols, session.image_size, session.device),
            mask_inputs=None,
            output_dict=_empty_output_dict(),
            num_frames=session.num_slices,
            track_in_reverse=False,
            run_mem_encoder=False,
            prev_sam_mask_logits=prev_mask_logits,
        )
        compact = _compact(model, out)
        if encode_memory:
            high_res = F.interpolate(
                compact["pred_masks"].float(),
                size=(session.image_size, session.image_size),
                mode="bilinear",
                align_corners=False,
            )
            mem, mem_pos = model._encode_new_memory(
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
    best, winner = up.max(dim=1)
    table = torch.tensor(list(values), dtype=torch.uint8, device=winner.device)
    return (table[winner] * (best > 0)).to(torch.uint8).cpu().numpy()


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

    def frame(self, step: int) -> int:
        return self.origin + self.sign * step


@dataclass
class PropagationResult:
    """Low-resolution logits per label per slice, plus what was done and how long it took."""

    logits: dict[str, dict[int, torch.Tensor]]  # label -> slice -> (h, w) logits
    object_scores: dict[str, dict[int, float]]
    label_values: dict[str, int]
    rows: int
    cols: int
    num_slices: int
    latencies: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    static_steps: int = 0

    def binary_mask(self, label: str, chunk: int = 32) -> np.ndarray:
        """(num_slices, rows, cols) bool mask of one label (before the overlap rule)."""
        out = np.zeros((self.num_slices, self.rows, self.cols), dtype=bool)
        frames = sorted(self.logits.get(label, {}))
        for start in range(0, len(frames), chunk):
            part = frames[start : start + chunk]
            logits = torch.stack([self.logits[label][f] for f in part]).unsqueeze(1)
            out[part] = (upsample_logits(logits, self.rows, self.cols) > 0).cpu().numpy()
        return out

    def label_frames(self, chunk: int = 16) -> np.ndarray:
        """(num_slices, rows, cols) uint8: every label's value where it wins (highest logit > 0)."""
        out = np.zeros((self.num_slices, self.rows, self.cols), dtype=np.uint8)
        labels = list(self.logits)
        frames = sorted({f for per in self.logits.values() for f in per})
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
            }
        return cov


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def propagate_volume(
    session: VolumeSession,
    prompts: Sequence[KeySlicePrompt],
    slice_range: tuple[int, int] | None = None,
    memory_horizon: int | None = None,
    steady: bool = True,
) -> PropagationResult:
    """Segment every label's key slices and propagate them through ``slice_range`` (inclusive; default all).

    All labels and both directions run as batched ``track_step`` calls; see the module docstring.
    Passes from a single key slice run their steps from static buffers (``steady``), replayed as CUDA graphs
    on a GPU; ``steady=False`` keeps every step on the stock ``track_step`` path.
    """
    if not prompts:
        raise ValueError("no prompts")
    model = session.model
    device = session.device
    n, rows, cols = session.frames.shape
    lo, hi = slice_range if slice_range is not None else (0, n - 1)
    lo, hi = max(0, lo), min(n - 1, hi)
    t0 = time.perf_counter()

    # Encode the slices the passes will visit, in batches, before tracking starts.
    by_label: dict[str, list[KeySlicePrompt]] = {}
    label_values: dict[str, int] = {}
    for p in prompts:
        by_label.setdefault(p.label, []).append(p)
        label_values[p.label] = p.label_value
    key_slices = {p.slice_index for p in prompts}
    span_lo = min(lo, min(key_slices))
    span_hi = max(hi, max(key_slices))
    session.encode(range(span_lo, span_hi + 1))
    _sync(device)
    t_encode = time.perf_counter()

    # Conditioning outputs on each key slice (per label: each prompt has its own number of points).
    passes: list[_Pass] = []
    for label, items in by_label.items():
        cond = {p.slice_index: segment_key_slice(session, p, encode_memory=True) for p in items}
        first, last = min(cond), max(cond)
        fwd_len = max(hi, last) - first
        bwd_len = last - min(lo, first)
        passes.append(_Pass(label, +1, first, fwd_len, {s - first: o for s, o in cond.items()}))
        passes.append(_Pass(label, -1, last, bwd_len, {last - s: o for s, o in cond.items()}))
    t_cond = time.perf_counter()

    logits: dict[str, dict[int, torch.Tensor]] = {name: {} for name in by_label}
    scores: dict[str, dict[int, float]] = {name: {} for name in by_label}
    score_tensors: dict[str, dict[int, torch.Tensor]] = {name: {} for name in by_label}
    horizon = memory_horizon or max(model.num_maskmem, model.max_obj_ptrs_in_encoder) + 1

    def record(step: int, batch: list[_Pass], masks: torch.Tensor, obj_scores: torch.Tensor) -> None:
        """Keep each pass's logits for its slice at ``step`` (the key slice: the max of both passes)."""
        masks = masks.to(torch.float16)  # a copy: graph outputs are overwritten by the next replay
        for pos, p in enumerate(batch):
            frame = p.frame(step)
            if step > p.length or not (lo <= frame <= hi or step in p.cond):
                continue
            prev = logits[p.label].get(frame)
            logits[p.label][frame] = masks[pos, 0] if prev is None else torch.maximum(prev, masks[pos, 0])
            score_tensors[p.label][frame] = obj_scores[pos, 0]

    # Passes whose key slices sit at the same steps share a memory layout and run as one batch.
    groups: dict[frozenset, list[_Pass]] = {}
    for p in passes:
        groups.setdefault(frozenset(p.cond), []).append(p)
    steps_run = 0
    static_run = 0
    marks: dict[str, float] = {}
    with autocast_for(device, session.compute_dtype), ExitStack() as borrowed:
        for cond_steps, group in groups.items():
            active = list(range(len(group)))
            od = {
                "cond_frame_outputs": {s: _cat([p.cond[s] for p in group]) for s in sorted(cond_steps)},
                "non_cond_frame_outputs": {},
            }
            max_len = max(p.length for p in group)
            static = steady and cond_steps == frozenset({0}) and static_tracking_supported(model)
            tracker: StaticTracker | None = None
            members = list(active)
            for step in range(0, max_len + 1):
                if static and step >= 1:
                    if tracker is None:
                        frames = [group[a].frame(1) for a in members]
                        feats = session.features(frames)
                        tracker = borrowed.enter_context(
                            borrowed_tracker(
                                model,
                                n,
                                od["cond_frame_outputs"][0],
                                session.stacked(frames),
                                feats.vision_pos_embeds,
                                feats.feat_sizes,
                                device,
                                session.compute_dtype,
                                use_graphs=device.type == "cuda",
                            )
                        )
                    if device.type != "cuda" and any(group[a].length < step for a in members):
                        # on the CPU finished passes leave the batch; a GPU keeps shapes static for its graphs
                        kept = [i for i, a in enumerate(members) if group[a].length >= step]
                        tracker.keep(kept)
                        members = [members[i] for i in kept]
                    # finished passes (GPU) keep computing on their last slice; their output is dropped
                    frames = [group[a].frame(min(step, group[a].length)) for a in members]
                    session.gather(frames, tracker.levels)
                    masks, obj_scores = tracker.step(step)
                    if static_run == 0:
                        _sync(device)
                        marks["first_static_step_done"] = time.perf_counter()
                    steps_run += 1
                    static_run += 1
                    record(step, [group[a] for a in members], masks, obj_scores.float().clone())
                    continue
                still = [a for a in active if group[a].length >= step]
                if len(still) < len(active):
                    keep = torch.tensor([active.index(a) for a in still], dtype=torch.long)
                    for kind in od:
                        od[kind] = {s: _select(o, keep) for s, o in od[kind].items()}
                    active = still
                if step in cond_steps:
                    out = od["cond_frame_outputs"][step]
                else:
                    frames = [group[a].frame(step) for a in active]
                    feats = session.features(frames)
                    raw = model.track_step(
                        frame_idx=step,
                        is_init_cond_frame=False,
                        current_vision_feats=feats.vision_feats,
                        current_vision_pos_embeds=feats.vision_pos_embeds,
                        feat_sizes=feats.feat_sizes,
                        point_inputs=None,
                        mask_inputs=None,
                        output_dict=od,
                        num_frames=n,
                        track_in_reverse=False,
                        run_mem_encoder=True,
                    )
                    out = _compact(model, raw)
                    od["non_cond_frame_outputs"][step] = out
                    od["non_cond_frame_outputs"].pop(step - horizon, None)
                    steps_run += 1
                record(step, [group[a] for a in active], out["pred_masks"], out["object_score_logits"])
    for name, per in score_tensors.items():
        if per:
            frames = sorted(per)
            values = torch.stack([per[f] for f in frames]).float().cpu().tolist()
            scores[name] = dict(zip(frames, values, strict=False))
    _sync(device)
    t_track = time.perf_counter()
    detail = {}
    if marks:  # the first static step includes the buffers' set-up (and a graph capture on a GPU)
        detail = {
            "track_first_static_step": round(marks["first_static_step_done"] - t_cond, 4),
            "track_other_steps": round(t_track - marks["first_static_step_done"], 4),
        }
    return PropagationResult(
        logits=logits,
        object_scores=scores,
        label_values=label_values,
        rows=rows,
        cols=cols,
        num_slices=n,
        latencies={
            "encode": round(t_encode - t0, 4),
            "key_slices": round(t_cond - t_encode, 4),
            "track": round(t_track - t_cond, 4),
            **detail,
        },
        steps=steps_run,
        static_steps=static_run,
    )
