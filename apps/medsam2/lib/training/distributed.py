"""Data-parallel fine-tuning over several processes (PyTorch DDP): which devices and backend a request asks
for, the launch of one process per device, and the few collectives the training loop needs. No MONAI Label
imports.

The request options follow MONAI Label's own trainers (``monailabel.tasks.train.basic_train``): ``multi_gpu``
turns it on, ``gpus`` is ``"all"`` (every visible CUDA device) or a comma-separated list such as ``"0,1"``;
with fewer than two devices selected training runs in one process as usual. MONAI Label's training runner
turns ``gpus`` into ``CUDA_VISIBLE_DEVICES`` and passes ``"all"``, so inside a server the list is the
visible devices.

``MEDSAM2_DDP_CPU_RANKS=N`` (N >= 2; for tests and development, not a user setting) makes a ``multi_gpu``
request run N CPU processes over gloo instead, whatever GPUs exist: the same code path without GPUs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CPU_RANKS_ENV = "MEDSAM2_DDP_CPU_RANKS"
# Rank 0 validates alone after each epoch while the other ranks wait in their next collective: allow for a
# long validation before a collective gives up.
COLLECTIVE_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class DistributedPlan:
    """One process per entry of ``devices`` (``"cuda:1"``, ``"cpu"``), joined over ``backend``."""

    backend: str
    devices: tuple[str, ...]

    @property
    def world_size(self) -> int:
        return len(self.devices)


@dataclass(frozen=True)
class DistributedContext:
    """What a training process knows about its group."""

    rank: int
    world_size: int


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _gpu_indices(gpus: Any, cuda_device_count: int) -> list[int]:
    if gpus is None or (isinstance(gpus, str) and gpus.strip().lower() in ("", "all")):
        return list(range(cuda_device_count))
    parts = gpus.split(",") if isinstance(gpus, str) else list(gpus) if isinstance(gpus, Sequence) else [gpus]
    try:
        indices = [int(str(p).strip()) for p in parts if str(p).strip()]
    except ValueError:
        raise ValueError(f'gpus must be "all" or GPU indices such as "0,1", got {gpus!r}') from None
    if len(set(indices)) != len(indices):
        raise ValueError(f"gpus names a GPU twice: {gpus!r}")
    bad = [i for i in indices if not 0 <= i < cuda_device_count]
    if bad:
        raise ValueError(f"gpus {gpus!r} names GPU {bad[0]}, but {cuda_device_count} CUDA device(s) are visible")
    return indices


def plan_distributed(
    multi_gpu: Any, gpus: Any, cuda_device_count: int, cpu_ranks: int = 0, nccl_available: bool = True
) -> DistributedPlan | None:
    """The processes a train request asks for, or None for a single process.

    ``multi_gpu`` false: None. ``cpu_ranks`` >= 2 (``MEDSAM2_DDP_CPU_RANKS``): that many CPU processes over
    gloo. Otherwise one process per selected CUDA device over NCCL (gloo where NCCL is missing); fewer than two
    selected devices: None, as MONAI Label does. A malformed ``gpus`` raises ValueError.
    """
    if not _as_bool(multi_gpu):
        return None
    if cpu_ranks >= 2:
        return DistributedPlan("gloo", ("cpu",) * cpu_ranks)
    indices = _gpu_indices(gpus, cuda_device_count)
    if len(indices) < 2:
        return None
    return DistributedPlan("nccl" if nccl_available else "gloo", tuple(f"cuda:{i}" for i in indices))


def cpu_ranks_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """``MEDSAM2_DDP_CPU_RANKS`` as a number (0 when unset)."""
    text = environ.get(CPU_RANKS_ENV, "").strip()
    try:
        return int(text) if text else 0
    except ValueError:
        raise ValueError(f"{CPU_RANKS_ENV} must be a whole number, got {text!r}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan: DistributedPlan, worker: Callable[..., None], args: tuple = ()) -> None:
    """Run ``worker(context, device, *args)`` in one new process per device of ``plan`` and wait for all.

    ``worker`` and ``args`` must be picklable (processes are spawned). If any process fails, the others are
    terminated and the failure is raised here (``torch.multiprocessing.ProcessRaisedException`` or
    ``ProcessExitedException``).
    """
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    logger.info("starting %d training processes (%s) on %s", plan.world_size, plan.backend, ", ".join(plan.devices))
    torch.multiprocessing.spawn(_entry, args=(plan, init_method, worker, args), nprocs=plan.world_size, join=True)


def _entry(rank: int, plan: DistributedPlan, init_method: str, worker: Callable[..., None], args: tuple) -> None:
    logging.basicConfig(
        level=logging.INFO, format=f"[%(asctime)s][%(levelname)5s](%(name)s) rank {rank} - %(message)s", force=True
    )
    device = torch.device(plan.devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // plan.world_size))
    dist.init_process_group(
        plan.backend, init_method=init_method, rank=rank, world_size=plan.world_size, timeout=COLLECTIVE_TIMEOUT
    )
    worker(DistributedContext(rank, plan.world_size), device, *args)
    # Only on success: after a failure the process exits, which ends the others' collectives (tearing the group
    # down cleanly could wait on peers that are blocked in one).
    dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: every rank must call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum over all ranks (a collective)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]
