"""3D propagation speed: this engine against the stock SAM2 video predictor, MONAI Label 0.8.5's JPEG-folder
path, and the image encoder alone (the ceiling), in one process on one synthetic CT volume.

Prints one JSON line per measurement; ratios are computed against the stock predictor of the same run.

    python bench/propagation_speed.py                        # GPU: 300 x 512 x 512, hiera-t 512 (MedSAM2)
    python bench/propagation_speed.py --slices 12 --size 256 # a quick CPU run
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from common import JsonLines, PeakMemory, device_name, dtype_name, sync, timed, use_repo_paths

use_repo_paths()

import sam2.sam2_video_predictor as stock_module  # noqa: E402

from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, image_size_overrides  # noqa: E402
from lib.engine.precision import autocast_for, compute_dtype_for  # noqa: E402
from lib.engine.preprocessing import frames_to_model_input, parse_window, to_uint8  # noqa: E402
from lib.engine.prompts import KeySlicePrompt  # noqa: E402
from lib.engine.propagation import propagate_volume  # noqa: E402
from lib.engine.volume_session import VolumeSession  # noqa: E402

# (centre j, centre i, radius) of five organ-like blobs, in [-1, 1] coordinates
OBJECTS = [(0.0, 0.0, 0.25), (-0.4, 0.4, 0.15), (0.4, -0.4, 0.2), (0.3, 0.5, 0.1), (-0.5, -0.3, 0.12)]


def synthetic_ct(slices: int, size: int, seed: int = 0) -> np.ndarray:
    """(k, j, i) HU volume: body ellipse, five organ-like blobs of different sizes."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(
        np.linspace(-1, 1, slices, dtype=np.float32),
        np.linspace(-1, 1, size, dtype=np.float32),
        np.linspace(-1, 1, size, dtype=np.float32),
        indexing="ij",
    )
    vol = np.full(k.shape, -1000.0, dtype=np.float32)
    vol[(j / 0.8) ** 2 + (i / 0.9) ** 2 <= 1] = 30.0
    for n, (cj, ci, r) in enumerate(OBJECTS):
        vol[((k / 0.8) ** 2 + ((j - cj) / r) ** 2 + ((i - ci) / r) ** 2) <= 1] = 100.0 + 40 * n
    vol += rng.normal(0, 10, vol.shape).astype(np.float32)
    return vol


def object_boxes(size: int) -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) pixel boxes of the five objects in a ``size`` x ``size`` slice."""
    boxes = []
    for cj, ci, r in OBJECTS:
        to_px = lambda v: (v + 1) / 2 * (size - 1)  # noqa: E731
        boxes.append((to_px(ci - r), to_px(cj - r), to_px(ci + r), to_px(cj + r)))
    return boxes


@contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on a GPU (as the stock predictor is run there), nothing on the CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def run_stock(model, state_factory, key: int, box, device, shape) -> tuple[int, np.ndarray]:
    """MedSAM2's procedure with the stock predictor: box on the key slice, forward; reset; box, reverse."""
    covered = 0
    union = np.zeros(shape, dtype=bool)
    with torch.inference_mode(), autocast(device):
        state = state_factory()
        for reverse in (False, True):
            model.reset_state(state)
            model.add_new_points_or_box(state, frame_idx=key, obj_id=1, box=list(box))
            for frame, _, masks in model.propagate_in_video(state, reverse=reverse):
                union[frame] |= (masks[0, 0] > 0).cpu().numpy()  # each slice's mask to the host, as a client needs it
                covered += 1
    return covered, union


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(2 * (a & b).sum() / max(int(a.sum()) + int(b.sum()), 1)), 4)


@dataclass
class Run:
    """One process's model, volume and prompts, and the lines reported so far (for the ratios)."""

    args: argparse.Namespace
    model: Any
    frames: np.ndarray
    device: torch.device
    batch: int
    engine_dtype: torch.dtype | None
    out: JsonLines
    results: dict[str, dict] = field(default_factory=dict)
    label_maps: dict[str, np.ndarray] = field(default_factory=dict)
    stock_mask: np.ndarray | None = None

    @property
    def key(self) -> int:
        return len(self.frames) // 2

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return object_boxes(self.args.size)

    @property
    def feature_dtype(self) -> torch.dtype:
        return self.engine_dtype or torch.float32

    def session(self, frames: np.ndarray | None = None, dtype: Any = "engine") -> VolumeSession:
        dtype = self.engine_dtype if dtype == "engine" else dtype
        frames = self.frames if frames is None else frames
        return VolumeSession(frames, self.model, self.device, dtype, self.feature_dtype, self.batch)

    def report(self, name: str, seconds: float, slices: int, mem: PeakMemory, **extra: Any) -> None:
        """One pipeline's line, with its speed-up over the stock predictor and share of the encoder ceiling."""
        line = {"pipeline": name, "seconds": round(seconds, 3), "slices": slices}
        line["slices_per_s"] = round(slices / seconds, 2)
        line["peak_mem_gib"] = mem.gib
        line.update(extra)
        if "stock" in self.results and name != "stock":
            line["speedup_vs_stock"] = round(line["slices_per_s"] / self.results["stock"]["slices_per_s"], 2)
        if "encoder" in self.results and name.startswith("engine"):
            ceiling = self.results["encoder"]["slices_per_s"]
            line["fraction_of_encoder_ceiling"] = round(line["slices_per_s"] / ceiling, 3)
        self.results[name] = self.out.emit(line)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="in-plane size of the synthetic volume")
    ap.add_argument("--image-size", type=int, default=512, help="model input size (512 = MedSAM2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--encode-batch", type=int, default=0, help="0: 16 on GPU, 4 on CPU")
    ap.add_argument("--skip", default="", help="comma list of pipelines to skip: stock,jpeg,engine,engine5,encoder")
    ap.add_argument("--out", default="", help="also append the JSON lines to this file")
    ap.add_argument("--profile", default="", help="write a torch.profiler table of one engine run to this file")
    ap.add_argument("--precision", default="auto", help="engine precision: auto (bf16 on GPU / bf16-capable CPU), fp32")
    return ap.parse_args()


def setup(args: argparse.Namespace) -> Run:
    """The random-weights MedSAM2-shaped model (object-score head saying "present") and the windowed volume."""
    device = torch.device(args.device)
    overrides = image_size_overrides(args.image_size) if args.image_size != 512 else []
    torch.manual_seed(0)
    model = build_model(MEDSAM2_CONFIG, device, overrides).eval()
    with torch.no_grad():  # random weights: make the object-score head say "present" so masks are not empty
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 4.0
    frames = to_uint8(synthetic_ct(args.slices, args.size), parse_window("abdomen"))
    engine_dtype = compute_dtype_for(device, args.precision)
    common = {
        "model": f"hiera-t {args.image_size} (MedSAM2 shape, random weights)",
        "device": device_name(device),
        "torch": torch.__version__,
        "host": platform.node(),
        "volume": list(frames.shape),
        "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "engine_dtype": dtype_name(engine_dtype),
    }
    batch = args.encode_batch or (16 if device.type == "cuda" else 4)
    return Run(args, model, frames, device, batch, engine_dtype, JsonLines(args.out, **common))


def warm_up(run: Run) -> None:
    """Not timed: kernels, allocator, a full encoder batch, and every memory length for 1 and 5 labels (cuDNN
    builds an attention plan per shape once per process; a server pays it on its first request)."""
    warm_frames = run.frames[max(0, run.key - 20) : run.key + 20]
    warm = run.session(warm_frames)
    for n_labels in (1, 5):
        prompts = [KeySlicePrompt(f"w{m}", m + 1, len(warm_frames) // 2, box=run.boxes[m]) for m in range(n_labels)]
        with timed(run.device) as t:
            propagate_volume(warm, prompts)
        run.out.fields[f"first_call_{len(warm_frames)}_slices_{n_labels}_labels_s"] = round(t.seconds, 3)
        propagate_volume(warm, prompts, steady=False)


def encoder_only(run: Run, name: str) -> None:
    """The image encoder alone over every slice in batches: the ceiling."""
    with PeakMemory(run.device) as mem, timed(run.device) as t:
        with torch.inference_mode(), autocast_for(run.device, run.engine_dtype):
            for s in range(0, len(run.frames), run.batch):
                run.model.forward_image(
                    frames_to_model_input(run.frames[s : s + run.batch], run.model.image_size, run.device)
                )
    run.report(name, t.seconds, len(run.frames), mem, batch=run.batch)


def stock_in_memory(run: Run) -> None:
    """The stock predictor on frames already in memory."""
    _, rows, cols = run.frames.shape
    images = frames_to_model_input(run.frames, run.model.image_size, "cpu")
    stock_module.load_video_frames = lambda **kw: (images.to(kw.get("compute_device", "cpu")), rows, cols)
    with PeakMemory(run.device) as mem, timed(run.device) as t:
        state_factory = lambda: run.model.init_state(video_path="in-memory")  # noqa: E731
        covered, run.stock_mask = run_stock(
            run.model, state_factory, run.key, run.boxes[0], run.device, run.frames.shape
        )
    run.report("stock", t.seconds, covered - 1, mem, note="frames in memory; forward, reset, reverse")


def stock_jpeg(run: Run) -> None:
    """MONAI Label 0.8.5's path: every slice written as JPEG, the folder loaded by the stock predictor."""
    from PIL import Image
    from sam2.utils.misc import load_video_frames as real_loader

    stock_module.load_video_frames = real_loader
    with PeakMemory(run.device) as mem, tempfile.TemporaryDirectory() as folder, timed(run.device) as t:
        for s in range(len(run.frames)):
            Image.fromarray(run.frames[s]).convert("RGB").save(os.path.join(folder, f"{s:05d}.jpg"))
        state_factory = lambda: run.model.init_state(video_path=folder)  # noqa: E731
        covered, _ = run_stock(run.model, state_factory, run.key, run.boxes[0], run.device, run.frames.shape)
    run.report("monailabel_0.8.5_jpeg", t.seconds, covered - 1, mem, note="every slice written as JPEG and re-read")


def engine_runs(run: Run, skip: set[str]) -> list[tuple[str, int, torch.dtype | None, bool]]:
    """(name, labels, dtype, static tracking step) of the engine variants this device runs."""
    runs = [("engine", 1, run.engine_dtype, True), ("engine_5_labels", 5, run.engine_dtype, True)]
    if run.device.type == "cuda":
        runs.append(("engine_no_static_step", 1, run.engine_dtype, False))
    if run.device.type == "cpu" and run.engine_dtype is not None:
        runs.append(("engine_fp32", 1, None, True))
    return [r for r in runs if "engine" not in skip and not (r[1] > 1 and "engine5" in skip)]


def engine(run: Run, name: str, n_labels: int, dtype: torch.dtype | None, steady: bool) -> None:
    """This app's ``propagate_volume`` from encoding to the full-resolution label volume on the host."""
    prompts = [KeySlicePrompt(f"label{m}", m + 1, run.key, box=run.boxes[m]) for m in range(n_labels)]
    with PeakMemory(run.device) as mem, timed(run.device) as t:
        result = propagate_volume(run.session(dtype=dtype), prompts, steady=steady)
        labels = result.label_frames()  # to the host, full resolution
    extra = {"labels": n_labels, "stages": result.latencies, "labelled_fraction": round(float((labels > 0).mean()), 4)}
    extra.update(dtype=dtype_name(dtype), static_steps=result.static_steps)
    run.label_maps[name] = labels > 0
    if n_labels == 1 and run.stock_mask is not None:
        extra["dice_vs_stock"] = dice(run.label_maps[name], run.stock_mask)
    if name != "engine" and n_labels == 1 and "engine" in run.label_maps:
        extra["dice_vs_engine"] = dice(run.label_maps[name], run.label_maps["engine"])
    if n_labels > 1 and "engine" in run.results:
        extra["cost_vs_one_label"] = round(t.seconds / run.results["engine"]["seconds"], 2)
    run.report(name, t.seconds, len(run.frames), mem, **extra)


def summary(run: Run) -> dict[str, Any]:
    """Speed-up over stock, fraction of the encoder ceiling (the faster encoder run), five labels over one."""
    results = run.results
    line: dict[str, Any] = {"pipeline": "summary"}
    ceiling = max((r["slices_per_s"] for k, r in results.items() if k.startswith("encoder")), default=None)
    if "engine" not in results:
        return line
    line["engine_slices_per_s"] = results["engine"]["slices_per_s"]
    if "stock" in results:
        line["engine_speedup_vs_stock"] = round(results["engine"]["slices_per_s"] / results["stock"]["slices_per_s"], 2)
    if ceiling:
        line["encoder_ceiling_slices_per_s"] = ceiling
        line["engine_fraction_of_encoder_ceiling"] = round(results["engine"]["slices_per_s"] / ceiling, 3)
    if "engine_5_labels" in results:
        line["five_labels_cost_vs_one"] = results["engine_5_labels"]["cost_vs_one_label"]
    return line


def write_profile(run: Run, path: str) -> None:
    """A torch.profiler table of one engine run (features encoded first), by total and by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    session = run.session()
    session.encode(range(len(run.frames)))
    with profile(activities=activities) as prof:
        propagate_volume(session, [KeySlicePrompt("label0", 1, run.key, box=run.boxes[0])])
        sync(run.device)
    sort = "cuda_time_total" if run.device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
        f.write("\n\nby self CPU time\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    args = parse_args()
    skip = set(filter(None, args.skip.split(",")))
    run = setup(args)
    warm_up(run)
    if "encoder" not in skip:
        encoder_only(run, "encoder")
    if "stock" not in skip:
        stock_in_memory(run)
    if "jpeg" not in skip:
        stock_jpeg(run)
    for variant in engine_runs(run, skip):
        engine(run, *variant)
    if "encoder" not in skip:  # again at the end: the ceiling is the faster of the two runs
        encoder_only(run, "encoder_again")
    run.out.emit(summary(run))
    if args.profile:
        write_profile(run, args.profile)


if __name__ == "__main__":
    main()
