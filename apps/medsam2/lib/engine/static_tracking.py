"""SAM2's per-slice tracking step from fixed-size buffers, so that a GPU replays it as a CUDA graph
instead of launching hundreds of small kernels from Python at every slice.

A pass that starts from one key slice attends, at step ``s``, to the key slice's memory, the memories of
the last ``min(s - 1, num_maskmem - 1)`` slices and the object pointers of the last
``min(s - 1, max_obj_ptrs - 1)`` slices. The buffers below hold exactly those, newest last (memories) or
newest first (pointers, as SAM2 orders them), and are rolled forward after each step. The step computes
what ``SAM2Base.track_step`` computes (same modules, same token order, same positional encodings);
``tests/test_propagation_matches_stock.py`` checks it against the stock predictor. Each distinct
(memories, pointers) count is one graph; from step ``max_obj_ptrs`` on, every step replays the same one.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from sam2.modeling.sam2_utils import get_1d_sine_pe

from lib.engine import sam2_api
from lib.engine.precision import autocast_for


def static_tracking_supported(model) -> bool:
    """Whether this model's config uses the memory layout the static step reproduces."""
    return (
        model.memory_temporal_stride_for_eval == 1
        and model.use_obj_ptrs_in_encoder
        and model.add_tpos_enc_to_obj_ptrs
        and model.proj_tpos_enc_in_obj_ptrs
        and model.use_signed_tpos_enc_to_obj_ptrs
        and model.only_obj_ptrs_in_the_past_for_eval
        and model.mem_dim < model.hidden_dim
        and model.num_maskmem >= 2
        and not model.non_overlap_masks_for_mem_enc
    )


class StaticTracker:
    """Buffers and the tracking step for a batch of passes that share one key step (step 0)."""

    def __init__(
        self,
        model,
        num_slices: int,
        key_out: dict,
        levels_like: list[torch.Tensor],
        pos_embeds: list[torch.Tensor],
        feat_sizes: list[tuple[int, int]],
        device: torch.device,
        compute_dtype: torch.dtype | None,
        use_graphs: bool,
    ):
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        self.use_graphs = use_graphs
        self.feat_sizes = feat_sizes
        self.num_ptrs = min(num_slices, model.max_obj_ptrs_in_encoder)
        self.levels = [torch.zeros_like(x, device=device) for x in levels_like]  # (B, C, H, W), filled per step
        self.pos = [p.to(device).float().clone() for p in pos_embeds]  # (HW, B, C), the same for every slice
        self.cond_mem = key_out["maskmem_features"].to(device, torch.bfloat16).clone()
        self.mem_pos = key_out["maskmem_pos_enc"][-1].to(device).float().clone()
        n_prev = model.num_maskmem - 1
        self.prev_mem = torch.zeros((n_prev, *self.cond_mem.shape), device=device, dtype=torch.bfloat16)
        self.ptrs = torch.zeros(self.num_ptrs, *key_out["obj_ptr"].shape, device=device)
        # temporal positions of the pointers: the key slice's (= the step) first, then 1, 2, ... steps back
        self.ptr_pos = torch.zeros(self.num_ptrs, dtype=torch.float32, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.last_memory: tuple[torch.Tensor, torch.Tensor] | None = None
        self.in_use = threading.Lock()
        self.reset(key_out, pos_embeds)

    def reset(self, key_out: dict, pos_embeds: list[torch.Tensor]) -> None:
        """Start new passes from a key-slice output, writing into the same buffers (graphs stay valid)."""
        self.cond_mem.copy_(key_out["maskmem_features"])
        self.mem_pos.copy_(key_out["maskmem_pos_enc"][-1])
        for buf, p in zip(self.pos, pos_embeds, strict=True):
            buf.copy_(p)
        self.prev_mem.zero_()
        self.ptrs.zero_()
        self.ptrs[0].copy_(key_out["obj_ptr"])
        self.ptr_pos.copy_(torch.arange(self.num_ptrs, dtype=torch.float32, device=self.device))

    @property
    def batch(self) -> int:
        return self.levels[0].shape[0]

    def _forward(self, n_prev: int, n_ptr: int) -> tuple[torch.Tensor, ...]:
        model = self.model
        batch = self.batch
        h, w = self.feat_sizes[-1]
        c_mem = model.mem_dim
        feats = [x.float().flatten(2).permute(2, 0, 1) for x in self.levels]
        # memory tokens: key slice (temporal index num_maskmem - 1), then the previous slices, oldest first
        n_frames = 1 + n_prev
        frames = torch.cat([self.cond_mem[None], self.prev_mem[self.prev_mem.shape[0] - n_prev :]]).float()
        mem = frames.flatten(3).permute(0, 3, 1, 2).reshape(n_frames * h * w, batch, c_mem)
        tpos = model.maskmem_tpos_enc  # (num_maskmem, 1, 1, C): index t for a slice t + 1 steps back
        tpos = torch.cat([tpos[model.num_maskmem - 1 :], tpos[:n_prev].flip(0)])
        mem_pos = self.mem_pos.flatten(2).permute(2, 0, 1)[None] + tpos
        mem_pos = mem_pos.reshape(n_frames * h * w, batch, c_mem)
        # object pointers, each split into hidden_dim / mem_dim tokens, with temporal encodings
        n = 1 + n_ptr
        pos = get_1d_sine_pe(self.ptr_pos[:n] / max(self.num_ptrs - 1, 1), dim=model.hidden_dim)
        obj_pos = model.obj_ptr_tpos_proj(pos).unsqueeze(1).expand(-1, batch, c_mem)
        split = model.hidden_dim // c_mem
        ptrs = self.ptrs[:n].reshape(-1, batch, split, c_mem).permute(0, 2, 1, 3).flatten(0, 1)
        obj_pos = obj_pos.repeat_interleave(split, dim=0)
        pix = model.memory_attention(
            curr=feats[-1:],
            curr_pos=self.pos[-1:],
            memory=torch.cat([mem, ptrs]),
            memory_pos=torch.cat([mem_pos, obj_pos]),
            num_obj_ptr_tokens=ptrs.shape[0],
        )
        pix = pix.permute(1, 2, 0).view(batch, model.hidden_dim, h, w)
        high_res = [
            x.permute(1, 2, 0).view(x.size(1), x.size(2), *size)
            for x, size in zip(feats[:-1], self.feat_sizes[:-1], strict=True)
        ]
        outs = sam2_api.forward_sam_heads(
            model,
            backbone_features=pix,
            point_inputs=None,
            mask_inputs=None,
            high_res_features=high_res,
            multimask_output=sam2_api.multimask_on_tracked_frames(model),
        )
        _, _, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits = outs
        new_mem, _ = sam2_api.encode_new_memory(
            model, feats, self.feat_sizes, high_res_masks, object_score_logits, False
        )
        best_iou = ious.max(dim=-1).values  # of the mask SAM2 picks
        return low_res_masks, obj_ptr, object_score_logits, best_iou, new_mem.to(torch.bfloat16)

    def _autocast(self):
        return autocast_for(self.device, self.compute_dtype, cache_enabled=False)

    def _graph_for(self, key: tuple[int, int]) -> tuple:
        if key not in self._graphs:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), self._autocast():
                self._forward(*key)  # warm-up outside the capture (library handles, autotuning)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), self._autocast():
                outputs = self._forward(*key)
            self._graphs[key] = (graph, outputs)
        return self._graphs[key]

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Track one step (features already in ``levels``) and roll the memory forward.

        Returns (low-res mask logits (B, 1, h, w), object score logits (B, 1), predicted IoU (B,));
        valid until the next call.
        """
        key = (min(step - 1, self.prev_mem.shape[0]), min(step - 1, self.num_ptrs - 1))
        self.ptr_pos[:1].fill_(float(step))  # a kernel argument, not a host-to-device copy (no sync)
        if self.use_graphs:
            graph, outputs = self._graph_for(key)
            graph.replay()
            masks, obj_ptr, scores, ious, new_mem = outputs
        else:
            with self._autocast():
                masks, obj_ptr, scores, ious, new_mem = self._forward(*key)
        self.prev_mem.copy_(torch.cat([self.prev_mem[1:], new_mem[None]]))
        if self.num_ptrs > 1:
            self.ptrs[1:].copy_(torch.cat([obj_ptr[None].float(), self.ptrs[1:-1]]))
        self.last_memory = (new_mem, obj_ptr)  # the step's memory and object pointer (valid until the next step)
        return masks, scores, ious

    def keep(self, positions: list[int]) -> None:
        """Drop finished passes from the batch (re-capturing graphs later, so meant for the CPU)."""
        idx = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.levels = [x.index_select(0, idx) for x in self.levels]
        self.pos = [p.index_select(1, idx) for p in self.pos]
        self.cond_mem = self.cond_mem.index_select(0, idx)
        self.mem_pos = self.mem_pos.index_select(0, idx)
        self.prev_mem = self.prev_mem.index_select(1, idx)
        self.ptrs = self.ptrs.index_select(1, idx)
        self._graphs.clear()


# Captured graphs are worth keeping between requests: capturing ~16 of them costs more than the tracking.
# Keyed by the model object (weakly: a reloaded model gets new graphs) and the batch's shapes.
_TRACKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TRACKERS_LOCK = threading.Lock()
MAX_CACHED_TRACKERS = 4


@contextmanager
def borrowed_tracker(
    model,
    num_slices: int,
    key_out: dict,
    levels_like: list[torch.Tensor],
    pos_embeds: list[torch.Tensor],
    feat_sizes: list[tuple[int, int]],
    device: torch.device,
    compute_dtype: torch.dtype | None,
    use_graphs: bool,
) -> Iterator[StaticTracker]:
    """A :class:`StaticTracker` for these shapes: a cached one (with its graphs) when free, else a new one."""
    key = (
        min(num_slices, model.max_obj_ptrs_in_encoder),
        tuple((tuple(x.shape), x.dtype) for x in levels_like),
        str(device),
        compute_dtype,
    )
    tracker = None
    if use_graphs:
        with _TRACKERS_LOCK:
            per_model = _TRACKERS.setdefault(model, OrderedDict())
            cached = per_model.get(key)
            if cached is not None and cached.in_use.acquire(blocking=False):
                per_model.move_to_end(key)
                tracker = cached
    if tracker is not None:
        tracker.reset(key_out, pos_embeds)
    else:
        tracker = StaticTracker(
            model, num_slices, key_out, levels_like, pos_embeds, feat_sizes, device, compute_dtype, use_graphs
        )
        tracker.in_use.acquire()
        if use_graphs:
            with _TRACKERS_LOCK:
                per_model = _TRACKERS.setdefault(model, OrderedDict())
                if key not in per_model:
                    per_model[key] = tracker
                    while len(per_model) > MAX_CACHED_TRACKERS:
                        per_model.popitem(last=False)
    try:
        yield tracker
    finally:
        tracker.in_use.release()
