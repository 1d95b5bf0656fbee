"""What the benchmarks share, so that each script keeps only what it measures.

- :func:`use_repo_paths`: the app (``lib``), ``tests`` (``conftest``, ``sam2_testing``), ``scripts`` and ``bench``
  on the import path, for a script run as ``python bench/x.py``; ``REPO``, the repository's root.
- :class:`JsonLines`: one JSON line per measurement, printed and appended to ``--out``, each with the device and
  the 1-minute load average (the machine is often shared); :meth:`JsonLines.write_array` for the benches whose
  results file is one JSON array.
- :func:`machine`, :func:`device_name`, :func:`dtype_name`, :func:`loadavg`: how a setup line names the machine.
- :func:`timed` (seconds, with the GPU synchronised), :class:`PeakMemory` (GPU allocator or process RSS),
  :func:`percentiles`, :func:`process_rss`.
- :func:`random_checkpoint_conf` and :func:`running_server`: a real server on a random-weights MedSAM2-shaped
  checkpoint, stopped whatever happens.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "medsam2"


def use_repo_paths() -> None:
    """Put the app, ``tests``, ``scripts`` and ``bench`` on ``sys.path`` (the app first: its ``lib`` package wins)."""
    for folder in (REPO / "bench", REPO / "scripts", REPO / "tests", APP):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def loadavg() -> float:
    """The 1-minute load average, rounded: every line says how busy the machine was."""
    return round(os.getloadavg()[0], 2)


def device_name(device: Any = None) -> str:
    """The GPU's name for a CUDA device, else ``cpu xN`` with N torch's intra-op threads."""
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()}"


def dtype_name(dtype: Any) -> str:
    """``bfloat16`` / ``float32`` for a torch dtype, ``float32`` for None (no autocast)."""
    import torch

    return str(dtype or torch.float32).replace("torch.", "")


def machine() -> dict[str, Any]:
    """The host, its CPU and cores, the torch version and the GPUs, for a bench's setup line."""
    import torch

    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
    }


class JsonLines:
    """Prints each measurement as one JSON line and appends it to ``out`` (when given).

    ``fields`` go into every line (e.g. ``bench``, ``device``); ``loadavg_1m`` is added to each line as it is
    written unless ``with_load`` is False. Every line is also kept in :attr:`lines`.
    """

    def __init__(self, out: str | Path | None = None, with_load: bool = True, **fields: Any):
        self.out = Path(out) if out else None
        self.with_load = with_load
        self.fields = fields
        self.lines: list[dict[str, Any]] = []

    def emit(self, line: dict[str, Any], append: bool = True) -> dict[str, Any]:
        """Print ``line`` (with the common fields) and append it to the file; returns the line as written."""
        full = {**self.fields, **line}
        if self.with_load:
            full.setdefault("loadavg_1m", loadavg())
        self.lines.append(full)
        text = json.dumps(full)
        print(text, flush=True)
        if self.out and append:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with self.out.open("a") as f:
                f.write(text + "\n")
        return full

    def write_array(self, path: str | Path) -> None:
        """Write every line so far as one JSON array, one line per element (the ``.json`` results files)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("[\n" + ",\n".join(json.dumps(line) for line in self.lines) + "\n]\n")


def sync(device: Any) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so that a clock reading means something."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Seconds of a :func:`timed` block (set when the block ends)."""

    seconds: float = 0.0


@contextmanager
def timed(device: Any = "cpu") -> Iterator[Timer]:
    """``with timed(device) as t: ...``; then ``t.seconds``, the GPU synchronised at both ends."""
    timer = Timer()
    sync(device)
    t0 = time.perf_counter()
    try:
        yield timer
    finally:
        sync(device)
        timer.seconds = time.perf_counter() - t0


def process_rss(pid: int | str = "self") -> int:
    """Resident memory of a process in bytes, from ``/proc`` (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


class PeakMemory:
    """Peak GPU memory (the allocator's) or peak RSS of this process sampled every 20 ms, over a ``with`` block."""

    def __init__(self, device: Any):
        import torch

        self.device = torch.device(device)
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = process_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, process_rss())

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, process_rss())

    @property
    def gib(self) -> float:
        return round(self.peak / (1 << 30), 3)


def percentiles(values: list[float]) -> dict[str, float | int]:
    """n, p50, p95, p99 and max of ``values`` (seconds), rounded to the millisecond; ``{"n": 0}`` when empty."""
    if not values:
        return {"n": 0}
    p = [float(v) for v in np.percentile(values, [50, 95, 99])]
    return {
        "n": len(values),
        "p50": round(p[0], 3),
        "p95": round(p[1], 3),
        "p99": round(p[2], 3),
        "max": round(max(values), 3),
    }


def random_checkpoint_conf(work: Path, image_size: int = 512, seed: int = 0) -> dict[str, str]:
    """``--conf`` entries for a random-weights MedSAM2-shaped checkpoint (hiera-t at ``image_size`` input, the
    object-score head shifted so that masks are not empty), saved in the official format under ``work``."""
    use_repo_paths()
    import torch

    from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, save_checkpoint
    from sam2_testing import object_present_bias, small_config_file

    torch.manual_seed(seed)
    conf: dict[str, str] = {}
    config = MEDSAM2_CONFIG
    if image_size != 512:
        config = small_config_file(work, image_size)
        conf["model_config"] = str(config)
    conf["checkpoint"] = str(work / "random_medsam2.pt")
    save_checkpoint(object_present_bias(build_model(config)), Path(conf["checkpoint"]))
    return conf


@contextmanager
def running_server(studies: Path, conf: dict[str, str], log: Path, timeout: float = 300, **kw: Any) -> Iterator[Any]:
    """The real MONAI Label server on ``studies`` (tests/conftest.py's ``start_server``), stopped on the way out."""
    use_repo_paths()
    from conftest import start_server, stop_server

    server = start_server(studies, conf, log, timeout, **kw)
    try:
        yield server
    finally:
        stop_server(server)
