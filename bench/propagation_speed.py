"""3D propagation speed: this engine against the stock SAM2 video predictor, MONAI Label 0.8.5's JPEG-folder
path, and the image encoder alone (the ceiling), in one process on one synthetic CT volume.

Prints one JSON line per measurement; ratios are computed against the stock predictor of the same run.

    python bench/propagation_speed.py                        # GPU: 300 x 512 x 512, hiera-t 512 (MedSAM2)
    python bench/propagation_speed.py --slices 12 --size 256 # a quick CPU run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))

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
    for n, (cj, ci, r) in enumerate(
        [(0.0, 0.0, 0.25), (-0.4, 0.4, 0.15), (0.4, -0.4, 0.2), (0.3, 0.5, 0.1), (-0.5, -0.3, 0.12)]
    ):
        vol[((k / 0.8) ** 2 + ((j - cj) / r) ** 2 + ((i - ci) / r) ** 2) <= 1] = 100.0 + 40 * n
    vol += rng.normal(0, 10, vol.shape).astype(np.float32)
    return vol


def object_boxes(size: int) -> list[tuple[float, float, float, float]]:
    boxes = []
    for cj, ci, r in OBJECTS:
        to_px = lambda v: (v + 1) / 2 * (size - 1)  # noqa: E731
        boxes.append((to_px(ci - r), to_px(cj - r), to_px(ci + r), to_px(cj + r)))
    return boxes


class PeakMemory:
    """Peak GPU memory (allocator) or peak process RSS sampled every 20 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def gib(self) -> float:
        return round(self.peak / (1 << 30), 3)


@contextmanager
def autocast(device: torch.device):
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def main() -> None:
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
    args = ap.parse_args()

    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    batch = args.encode_batch or (16 if device.type == "cuda" else 4)
    overrides = image_size_overrides(args.image_size) if args.image_size != 512 else []
    torch.manual_seed(0)
    model = build_model(MEDSAM2_CONFIG, device, overrides).eval()
    with torch.no_grad():  # random weights: make the object-score head say "present" so masks are not empty
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 4.0
    model_name = f"hiera-t {args.image_size} (MedSAM2 shape, random weights)"
    frames = to_uint8(synthetic_ct(args.slices, args.size), parse_window("abdomen"))
    n, rows, cols = frames.shape
    key = n // 2
    boxes = object_boxes(args.size)
    base = {
        "model": model_name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__,
        "host": platform.node(),
        "volume": [n, rows, cols],
        "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
    }
    results: dict[str, dict] = {}
    stock_mask = None

    def report(name: str, seconds: float, slices: int, mem: PeakMemory, **extra):
        line = {"pipeline": name, **base, "seconds": round(seconds, 3), "slices": slices}
        line["slices_per_s"] = round(slices / seconds, 2)
        line["peak_mem_gib"] = mem.gib
        line.update(extra)
        if "stock" in results and name != "stock":
            line["speedup_vs_stock"] = round(line["slices_per_s"] / results["stock"]["slices_per_s"], 2)
        if "encoder" in results and name.startswith("engine"):
            line["fraction_of_encoder_ceiling"] = round(line["slices_per_s"] / results["encoder"]["slices_per_s"], 3)
        results[name] = line
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")

    engine_dtype = compute_dtype_for(device, args.precision)
    feature_dtype = engine_dtype or torch.float32
    base["engine_dtype"] = str(engine_dtype or torch.float32).replace("torch.", "")

    # warm-up, not timed: kernels, allocator, a full encoder batch, and every memory length for 1 and 5 labels
    # (cuDNN builds an attention plan per shape once per process; a server pays it on its first request)
    warm_frames = frames[max(0, key - 20) : key + 20]
    warm = VolumeSession(warm_frames, model, device, engine_dtype, feature_dtype, batch)
    for n_labels in (1, 5):
        warm_prompts = [KeySlicePrompt(f"w{m}", m + 1, len(warm_frames) // 2, box=boxes[m]) for m in range(n_labels)]
        sync(device)
        t0 = time.perf_counter()
        propagate_volume(warm, warm_prompts)
        sync(device)
        base[f"first_call_{len(warm_frames)}_slices_{n_labels}_labels_s"] = round(time.perf_counter() - t0, 3)
        propagate_volume(warm, warm_prompts, steady=False)
    del warm

    def encoder_only(frames=frames):
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast_for(device, engine_dtype):
                for s in range(0, n, batch):
                    model.forward_image(frames_to_model_input(frames[s : s + batch], model.image_size, device))
            sync(device)
            return time.perf_counter() - t0, mem

    if "encoder" not in skip:
        dt, mem = encoder_only()
        report("encoder", dt, n, mem, batch=batch)

    if "stock" not in skip:
        images = frames_to_model_input(frames, model.image_size, "cpu")
        stock_module.load_video_frames = lambda **kw: (images.to(kw.get("compute_device", "cpu")), rows, cols)
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            covered, stock_mask = run_stock(
                model, lambda: model.init_state(video_path="in-memory"), key, boxes[0], device, frames.shape
            )
            sync(device)
            dt = time.perf_counter() - t0
        report("stock", dt, covered - 1, mem, note="frames in memory; forward, reset, reverse")

    if "jpeg" not in skip:
        from PIL import Image
        from sam2.utils.misc import load_video_frames as real_loader

        stock_module.load_video_frames = real_loader
        with PeakMemory(device) as mem, tempfile.TemporaryDirectory() as folder:
            sync(device)
            t0 = time.perf_counter()
            for s in range(n):
                Image.fromarray(frames[s]).convert("RGB").save(os.path.join(folder, f"{s:05d}.jpg"))
            covered, _ = run_stock(
                model, lambda: model.init_state(video_path=folder), key, boxes[0], device, frames.shape
            )
            sync(device)
            dt = time.perf_counter() - t0
        report("monailabel_0.8.5_jpeg", dt, covered - 1, mem, note="every slice written as JPEG and re-read")

    runs = [("engine", 1, engine_dtype, True), ("engine_5_labels", 5, engine_dtype, True)]
    if device.type == "cuda":
        runs.append(("engine_no_static_step", 1, engine_dtype, False))
    if device.type == "cpu" and engine_dtype is not None:
        runs.append(("engine_fp32", 1, None, True))
    label_maps = {}
    for name, n_labels, dtype, steady in runs:
        if "engine" in skip or (n_labels > 1 and "engine5" in skip):
            continue
        prompts = [KeySlicePrompt(f"label{m}", m + 1, key, box=boxes[m]) for m in range(n_labels)]
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            session = VolumeSession(frames, model, device, dtype, feature_dtype, batch)
            result = propagate_volume(session, prompts, steady=steady)
            labels = result.label_frames()  # to the host, full resolution
            sync(device)
            dt = time.perf_counter() - t0
        extra = {
            "labels": n_labels,
            "stages": result.latencies,
            "labelled_fraction": round(float((labels > 0).mean()), 4),
        }
        extra["dtype"] = str(dtype or torch.float32).replace("torch.", "")
        extra["static_steps"] = result.static_steps
        label_maps[name] = labels > 0
        if n_labels == 1 and stock_mask is not None:
            extra["dice_vs_stock"] = dice(label_maps[name], stock_mask)
        if name != "engine" and n_labels == 1 and "engine" in label_maps:
            extra["dice_vs_engine"] = dice(label_maps[name], label_maps["engine"])
        if n_labels > 1 and "engine" in results:
            extra["cost_vs_one_label"] = round(dt / results["engine"]["seconds"], 2)
        report(name, dt, n, mem, **extra)
        del session, result

    if "encoder" not in skip:  # again at the end: the ceiling is the faster of the two runs
        dt, mem = encoder_only()
        report("encoder_again", dt, n, mem, batch=batch)

    summary = {"pipeline": "summary", **base}
    ceiling = max((r["slices_per_s"] for k, r in results.items() if k.startswith("encoder")), default=None)
    if "engine" in results:
        summary["engine_slices_per_s"] = results["engine"]["slices_per_s"]
        if "stock" in results:
            summary["engine_speedup_vs_stock"] = round(
                results["engine"]["slices_per_s"] / results["stock"]["slices_per_s"], 2
            )
        if ceiling:
            summary["encoder_ceiling_slices_per_s"] = ceiling
            summary["engine_fraction_of_encoder_ceiling"] = round(results["engine"]["slices_per_s"] / ceiling, 3)
        if "engine_5_labels" in results:
            summary["five_labels_cost_vs_one"] = results["engine_5_labels"]["cost_vs_one_label"]
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(summary) + "\n")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        session = VolumeSession(frames, model, device, engine_dtype, feature_dtype, batch)
        session.encode(range(n))
        with profile(activities=activities) as prof:
            propagate_volume(session, [KeySlicePrompt("label0", 1, key, box=boxes[0])])
            sync(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
            f.write("\n\nby self CPU time\n")
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
