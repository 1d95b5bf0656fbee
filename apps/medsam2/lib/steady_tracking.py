"""SAM2's per-slice tracking step in its steady state, with static shapes, so that a GPU can replay it as
one CUDA graph instead of hundreds of separately launched kernels.

Once a pass is far enough from its key slice, every step attends to the same memory layout: the key
slice's memory, the ``num_maskmem - 1`` previous slices' memories and ``max_obj_ptrs - 1`` previous object
pointers. This module computes exactly what ``SAM2Base.track_step`` computes for such a step (same
modules, same order of memory tokens, same positional encodings), from fixed-size buffers that are
rolled forward between steps. ``tests/test_propagation_matches_stock.py`` checks it against the stock
predictor on volumes long enough to reach the steady state.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from sam2.modeling.sam2_utils import get_1d_sine_pe


def steady_state_start(model, num_slices: int) -> int | None:
    """First step at which the memory layout no longer changes (None if this model config can't use it)."""
    if (
        model.memory_temporal_stride_for_eval != 1
        or not model.use_obj_ptrs_in_encoder
        or not model.add_tpos_enc_to_obj_ptrs
        or not model.proj_tpos_enc_in_obj_ptrs
        or not model.use_signed_tpos_enc_to_obj_ptrs
        or not model.only_obj_ptrs_in_the_past_for_eval
        or model.mem_dim >= model.hidden_dim
        or model.num_maskmem < 2
    ):
        return None
    return max(min(num_slices, model.max_obj_ptrs_in_encoder), model.num_maskmem)


class SteadyTracker:
    """Static buffers + the steady-state step for a batch of passes sharing one key step (step 0)."""

    def __init__(
        self,
        model,
        num_slices: int,
        levels_like: list[torch.Tensor],
        pos_embeds: list[torch.Tensor],
        feat_sizes: list[tuple[int, int]],
        device: torch.device,
        compute_dtype: torch.dtype | None,
    ):
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        self.feat_sizes = feat_sizes
        self.num_ptrs = min(num_slices, model.max_obj_ptrs_in_encoder)
        batch = levels_like[0].shape[0]
        self.levels = [torch.zeros_like(x, device=device) for x in levels_like]  # (B, C, H, W), filled per step
        self.pos = [p.to(device).float() for p in pos_embeds]  # (HW, B, C), constant
        h, w = feat_sizes[-1]
        self.cond_mem = torch.zeros(batch, model.mem_dim, h, w, device=device, dtype=torch.bfloat16)
        self.prev_mem = torch.zeros(
            model.num_maskmem - 1, batch, model.mem_dim, h, w, device=device, dtype=torch.bfloat16
        )
        self.mem_pos = torch.zeros(batch, model.mem_dim, h, w, device=device)
        # pointers in the stock order: key slice's first, then 1, 2, ... steps back
        self.ptrs = torch.zeros(self.num_ptrs, batch, model.hidden_dim, device=device)
        self.ptr_pos = torch.arange(self.num_ptrs, dtype=torch.float32, device=device)
        self._graph = None
        self._outputs: tuple[torch.Tensor, ...] | None = None

    def load(self, od: dict, step: int) -> None:
        """Fill the buffers from the stock-format output dict before the first steady step ``step``."""
        cond = od["cond_frame_outputs"][0]
        non_cond = od["non_cond_frame_outputs"]
        self.cond_mem.copy_(cond["maskmem_features"])
        self.mem_pos.copy_(cond["maskmem_pos_enc"][-1])
        n_prev = self.model.num_maskmem - 1
        self.prev_mem.copy_(torch.stack([non_cond[step - n_prev + i]["maskmem_features"] for i in range(n_prev)]))
        self.ptrs.copy_(
            torch.stack([cond["obj_ptr"]] + [non_cond[step - t]["obj_ptr"] for t in range(1, self.num_ptrs)])
        )

    def _forward(self) -> tuple[torch.Tensor, ...]:
        model = self.model
        batch = self.levels[0].shape[0]
        n_mem = model.num_maskmem
        h, w = self.feat_sizes[-1]
        feats = [x.float().flatten(2).permute(2, 0, 1) for x in self.levels]
        # memory tokens: key slice (t_pos 0), then t_pos 1 .. n_mem-1 = oldest .. newest previous slice
        mem = torch.cat([self.cond_mem[None], self.prev_mem]).float()
        mem = mem.flatten(3).permute(0, 3, 1, 2).reshape(n_mem * h * w, batch, model.mem_dim)
        tpos = model.maskmem_tpos_enc[torch.arange(n_mem - 1, -1, -1, device=self.device)]  # (n_mem, 1, 1, C)
        mem_pos = self.mem_pos.flatten(2).permute(2, 0, 1)[None] + tpos
        mem_pos = mem_pos.reshape(n_mem * h * w, batch, model.mem_dim)
        # object pointers, split into mem_dim-sized tokens, with their temporal encodings
        t_diff_max = max(self.num_ptrs - 1, 1)
        obj_pos = model.obj_ptr_tpos_proj(get_1d_sine_pe(self.ptr_pos / t_diff_max, dim=model.hidden_dim))
        obj_pos = obj_pos.unsqueeze(1).expand(-1, batch, model.mem_dim)
        split = model.hidden_dim // model.mem_dim
        ptrs = self.ptrs.reshape(-1, batch, split, model.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
        obj_pos = obj_pos.repeat_interleave(split, dim=0)
        memory = torch.cat([mem, ptrs])
        memory_pos = torch.cat([mem_pos, obj_pos])
        pix = model.memory_attention(
            curr=feats[-1:],
            curr_pos=self.pos[-1:],
            memory=memory,
            memory_pos=memory_pos,
            num_obj_ptr_tokens=ptrs.shape[0],
        )
        pix = pix.permute(1, 2, 0).view(batch, model.hidden_dim, h, w)
        high_res = [
            x.permute(1, 2, 0).view(x.size(1), x.size(2), *size)
            for x, size in zip(feats[:-1], self.feat_sizes[:-1], strict=True)
        ]
        outs = model._forward_sam_heads(
            backbone_features=pix,
            point_inputs=None,
            mask_inputs=None,
            high_res_features=high_res,
            multimask_output=model._use_multimask(False, None),
        )
        _, _, _, low_res_masks, high_res_masks, obj_ptr, object_score_logits = outs
        new_mem, _ = model._encode_new_memory(feats, self.feat_sizes, high_res_masks, object_score_logits, False)
        return low_res_masks, obj_ptr, object_score_logits, new_mem.to(torch.bfloat16)

    def _autocast(self):
        if self.compute_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype, cache_enabled=False)

    def step(self, step: int, use_graph: bool) -> tuple[torch.Tensor, ...]:
        """One steady step at ``step`` (features already in ``levels``); rolls the memory forward.

        Returns (low-res mask logits (B, 1, h, w), object score logits (B, 1)), valid until the next call.
        """
        self.ptr_pos[0] = float(step)
        if use_graph and self._graph is None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), self._autocast():
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph), self._autocast():
                self._outputs = self._forward()
        if use_graph:
            self._graph.replay()
            masks, obj_ptr, scores, new_mem = self._outputs  # type: ignore[misc]
        else:
            with self._autocast():
                masks, obj_ptr, scores, new_mem = self._forward()
        self.prev_mem.copy_(torch.cat([self.prev_mem[1:], new_mem[None]]))
        if self.num_ptrs > 1:
            self.ptrs[1:].copy_(torch.cat([obj_ptr[None].float(), self.ptrs[1:-1]]))
        return masks, scores
