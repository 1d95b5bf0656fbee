"""Fine-tune the MedSAM2-shaped model (hiera-t 512) from random weights on generated 3D volumes for a number of
epochs (warm-up, cosine decay, early stopping) within a time limit; print one JSON line per epoch (held-out
propagated Dice/NSD, training slices/s, learning rate) and a summary.

    python bench/finetune_speed.py --minutes 10 --out bench/results/finetune_h100_10min.jsonl   # GPU
    python bench/finetune_speed.py --minutes 20 --image-size 256 --size 48 --epochs 8 --steps-per-epoch 16 \
        --clips-per-step 2 --out bench/results/finetune_cpu.jsonl                               # 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))

from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, image_size_overrides  # noqa: E402
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.training.data import Study  # noqa: E402
from lib.training.loop import train  # noqa: E402
from lib.training.settings import TrainSettings  # noqa: E402


def generated_study(seed: int, slices: int, size: int) -> Study:
    """Noisy soft tissue with three ellipsoids of different brightness and size (labels 1..3)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(np.arange(slices), np.arange(size), np.arange(size), indexing="ij")
    image = rng.normal(60, 25, (slices, size, size))
    label = np.zeros(image.shape, np.uint8)
    for value, boost in ((1, 120), (2, 80), (3, -45)):
        c = (rng.uniform(0.25, 0.75) * slices, rng.uniform(0.25, 0.75) * size, rng.uniform(0.25, 0.75) * size)
        r = (rng.uniform(0.12, 0.3) * slices, rng.uniform(0.08, 0.18) * size, rng.uniform(0.08, 0.18) * size)
        inside = ((k - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((i - c[2]) / r[2]) ** 2 <= 1
        image[inside] += boost
        label[inside & (label == 0)] = value
    return Study(f"gen{seed}", np.clip(image, 0, 255).astype(np.uint8), label, (2.5, 1.0, 1.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--size", type=int, default=128, help="in-plane size of the generated volumes")
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--train-studies", type=int, default=24)
    ap.add_argument("--val-studies", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=40, help="the schedule's length; --minutes may stop it sooner")
    ap.add_argument("--steps-per-epoch", type=int, default=64, help="training clips per epoch")
    ap.add_argument("--clips-per-step", type=int, default=8)
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--train-parts", default="all")
    ap.add_argument("--lr", type=float, default=2e-4, help="per clip; scaled by sqrt(clips per step)")
    ap.add_argument("--lr-image-encoder", type=float, default=5e-5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = compute_dtype_for(device)
    overrides = image_size_overrides(args.image_size) if args.image_size != 512 else []
    torch.manual_seed(0)
    model = build_model(MEDSAM2_CONFIG, device, overrides)
    train_set = [generated_study(s, args.slices, args.size) for s in range(args.train_studies)]
    val_set = [generated_study(1000 + s, args.slices, args.size) for s in range(args.val_studies)]
    settings = TrainSettings(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        clips_per_step=args.clips_per_step,
        patience=args.patience,
        clip_length=8,
        max_objects=3,
        lr=args.lr,
        lr_image_encoder=args.lr_image_encoder,
        grad_clip=1.0,
        train_parts=args.train_parts,
        p_box=1.0,
    )
    base = {
        "model": f"hiera-t {args.image_size} (MedSAM2 shape), random init",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "train_parts": args.train_parts,
        "volumes": f"{args.train_studies} train + {args.val_studies} held out, {args.slices}x{args.size}x{args.size}",
    }
    deadline = time.time() + 60 * args.minutes
    started = time.time()

    def emit(line: dict) -> None:
        text = json.dumps({**base, **line})
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")

    def on_epoch(report, result) -> None:
        emit(
            {
                "epoch": report.epoch,
                "elapsed_s": round(time.time() - started, 1),
                "train_loss": round(report.train_loss, 4),
                "val_dice": round(report.val_dice, 4),
                "val_nsd": round(report.val_nsd, 4),
                "train_slices_per_s": report.slices_per_second,
                "lr": report.lr,
            }
        )

    result = train(
        model,
        train_set,
        val_set,
        settings,
        device,
        dtype,
        lambda m, r: None,
        on_epoch,
        should_stop=lambda: time.time() > deadline,
    )
    emit(
        {
            "summary": True,
            "minutes": args.minutes,
            "initial_val_dice": round(result.initial["dice"], 4),
            "best_val_dice": round(result.best_dice, 4),
            "best_epoch": result.best_epoch,
            "epochs": len(result.epochs),
            "stopped_early": result.stopped_early,
            "clips_per_step": args.clips_per_step,
            "mean_train_slices_per_s": round(float(np.mean([e.slices_per_second for e in result.epochs])), 2)
            if result.epochs
            else None,
        }
    )


if __name__ == "__main__":
    main()
