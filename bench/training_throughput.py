"""Training throughput of today's loop against the batched loop, in the same run: the MedSAM2 shape (hiera-t,
512 input) from random weights on generated volumes, the same clips per epoch, no validation (it is not what
is measured). One JSON line per run and a summary line per ``train_parts`` with the ratio.

    python bench/training_throughput.py --out bench/results/training_throughput_cpu.jsonl     # CPU, 2 cores
    python bench/training_throughput.py --clips 256 --epochs 3 --out bench/results/training_throughput_h100.jsonl

``today``: one clip per optimiser step, every slice re-encoded every time (the loop before this change).
``cached``: one clip per step, image-encoder outputs reused while the encoder is frozen (the CPU default).
``batched``: ``--clips-per-step`` clips per step and the cache (the GPU default, 4); ``batched_no_cache``.
Runs alternate (today, cached, batched, ...) so drifting machine load hits them alike. Batches multiply
activation memory: 4 clips of 3 objects at 512 input needed more than 21 GiB on the CPU (killed).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import JsonLines, device_name, dtype_name, use_repo_paths

use_repo_paths()

from finetune_speed import generated_study  # noqa: E402

from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, image_size_overrides  # noqa: E402
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.training.loop import train  # noqa: E402
from lib.training.settings import TrainSettings  # noqa: E402

VARIANTS = {  # clips_per_step None: --clips-per-step
    "today": {"clips_per_step": 1, "feature_cache_mb": 0},
    "cached": {"clips_per_step": 1},
    "batched": {"clips_per_step": None},
    "batched_no_cache": {"clips_per_step": None, "feature_cache_mb": 0},
}


def run(variant: str, parts: str, args, studies, device, dtype) -> dict:
    """One training run; training slices per second over all its epochs."""
    torch.manual_seed(0)
    overrides = image_size_overrides(args.image_size) if args.image_size != 512 else []
    model = build_model(MEDSAM2_CONFIG, device, overrides)
    settings = TrainSettings(
        epochs=args.epochs,
        steps_per_epoch=args.clips,
        clip_length=8,
        max_objects=3,
        lr=1e-4,
        train_parts=parts,
        p_box=1.0,
        patience=0,
        **{k: args.clips_per_step if v is None else v for k, v in VARIANTS[variant].items()},
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train(model, studies, [], settings, device, dtype, lambda m, r: None)
    slices = sum(e.train_slices for e in result.epochs)
    seconds = sum(e.train_seconds for e in result.epochs)
    line = {
        "variant": variant,
        "train_parts": parts,
        "clips_per_step": settings.clips_per_step,
        "epochs": len(result.epochs),
        "slices": slices,
        "train_seconds": round(seconds, 2),
        "slices_per_s": round(slices / seconds, 3),
        "per_epoch_slices_per_s": [e.slices_per_second for e in result.epochs],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if device.type == "cuda":
        line["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--size", type=int, default=96, help="in-plane size of the generated volumes")
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--clips", type=int, default=8, help="clips per epoch")
    ap.add_argument("--clips-per-step", type=int, default=4, help="of the batched variants")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-parts", default="no_image_encoder,all")
    ap.add_argument("--variants", default="today,cached,batched")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = compute_dtype_for(device, args.precision)
    studies = [generated_study(s, args.slices, args.size) for s in range(args.studies)]
    base = {
        "bench": "training_throughput",
        "model": f"hiera-t {args.image_size} (MedSAM2 shape), random init",
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
        "volumes": f"{args.studies} x {args.slices}x{args.size}x{args.size}",
        "clips_per_epoch": args.clips,
        "clip_length": 8,
    }

    emit = JsonLines(args.out, **base).emit
    variants = args.variants.split(",")
    for parts in args.train_parts.split(","):
        runs: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                line = run(variant, parts, args, studies, device, dtype)
                runs[variant].append(line["slices_per_s"])
                emit(line)
        today = sum(runs["today"]) / len(runs["today"]) if runs.get("today") else None
        summary = {"summary": True, "train_parts": parts}
        for variant, speeds in runs.items():
            mean = sum(speeds) / len(speeds)
            summary[f"{variant}_slices_per_s"] = round(mean, 3)
            if today and variant != "today":
                summary[f"{variant}_vs_today"] = round(mean / today, 2)
        emit(summary)


if __name__ == "__main__":
    main()
