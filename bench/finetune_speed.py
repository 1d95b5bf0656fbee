"""Fine-tune a model (from random weights, or from ``--init``) on generated 3D volumes for a number of epochs (warm-up,
cosine decay, early stopping) within a time limit, at the app's training defaults unless told otherwise; one JSON
line per epoch (training loss, the largest step loss over the running median of the steps before it, steps the spike
guard skipped or rolled back, held-out propagated Dice/NSD and overlap with objects not prompted, training slices/s,
learning rate) and a summary that says whether the epoch loss ever exceeded twice the running median of the epochs
before it once the warm-up was over. Each line names the device.

    python bench/finetune_speed.py --minutes 10 --out bench/results/finetune_h200.jsonl           # GPU, MedSAM2 shape
    python bench/finetune_speed.py --model reference --init tests/fixtures/reference_sam2.pt \
        --minutes 20 --out bench/results/finetune_cpu.jsonl                                      # 2 CPU cores
    # the settings of the H200 run of issue 29 (8 clips per step, peak lr 5.6e-4, gradient clip 1):
    python bench/finetune_speed.py --lr 2e-4 --lr-image-encoder 5e-5 --clips-per-step 8 --grad-clip 1 --minutes 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))

from lib.engine.checkpoints import (  # noqa: E402
    MEDSAM2_CONFIG,
    build_model,
    image_size_overrides,
    load_state_dict_strict,
)
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.training.data import Study  # noqa: E402
from lib.training.loop import clips_per_step_on, scaled_lr, train  # noqa: E402
from lib.training.settings import TrainSettings  # noqa: E402
from lib.training.synthetic import TRAIN_SEEDS, VolumeRecipe, generate_studies, held_out_studies  # noqa: E402

REFERENCE_CONFIG = REPO / "apps" / "medsam2" / "model" / "configs" / "reference_sam2.yaml"


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


def parse_args() -> argparse.Namespace:
    defaults = TrainSettings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument(
        "--model",
        choices=("medsam2", "reference"),
        default="medsam2" if torch.cuda.is_available() else "reference",
        help="the MedSAM2 shape (hiera-t) or the reference model's config (128 input)",
    )
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint (default: random weights)")
    ap.add_argument("--image-size", type=int, default=512, help="input size of the MedSAM2 shape")
    ap.add_argument(
        "--data",
        choices=("synthetic", "ellipsoids"),
        default="synthetic",
        help="lib/training/synthetic.py (several similar objects) or three ellipsoids of different brightness",
    )
    ap.add_argument(
        "--size", type=int, default=0, help="in-plane size of the volumes (0: 64 synthetic, 128 ellipsoids)"
    )
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--train-studies", type=int, default=24)
    ap.add_argument("--val-studies", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=40, help="the schedule's length; --minutes may stop it sooner")
    ap.add_argument("--steps-per-epoch", type=int, default=64, help="training clips per epoch")
    ap.add_argument(
        "--clips-per-step",
        type=int,
        default=defaults.clips_per_step,
        help="0: the app's default (4 on a GPU, 1 on a CPU)",
    )
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--train-parts", default="all")
    ap.add_argument("--loss", default=defaults.loss, choices=("sam2", "dice_ce"))
    ap.add_argument("--lr", type=float, default=defaults.lr, help="per clip; scaled by sqrt(clips per step)")
    ap.add_argument("--lr-image-encoder", type=float, default=defaults.lr_image_encoder)
    ap.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    ap.add_argument("--spike-factor", type=float, default=defaults.spike_factor, help="0: the spike guard off")
    ap.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    return ap.parse_args()


def build(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The model to train and its description."""
    torch.manual_seed(args.seed)
    if args.model == "reference":
        model, name = build_model(REFERENCE_CONFIG, device), "reference model config (128 input)"
    else:
        overrides = image_size_overrides(args.image_size) if args.image_size != 512 else []
        model, name = build_model(MEDSAM2_CONFIG, device, overrides), f"hiera-t {args.image_size} (MedSAM2 shape)"
    if args.init:
        load_state_dict_strict(model, args.init)
    return model, f"{name}, {'from ' + args.init.name if args.init else 'random init'}"


def studies(args: argparse.Namespace) -> tuple[list[Study], list[Study], str]:
    """Training and held-out volumes, and their description."""
    if args.data == "synthetic":
        recipe = VolumeRecipe(slices=args.slices, size=args.size or 64)
        train_set = generate_studies(TRAIN_SEEDS[: args.train_studies], recipe)
        val_set = held_out_studies(args.val_studies, recipe)
        kind = "lib/training/synthetic.py"
    else:
        size = args.size or 128
        train_set = [generated_study(s, args.slices, size) for s in range(args.train_studies)]
        val_set = [generated_study(1000 + s, args.slices, size) for s in range(args.val_studies)]
        kind = "three ellipsoids"
    shape = "x".join(str(n) for n in train_set[0].frames.shape)
    return train_set, val_set, f"{args.train_studies} train + {args.val_studies} held out, {shape} ({kind})"


def loss_over_running_median(losses: list[float], first: int) -> float | None:
    """The largest epoch loss over the median of the epoch losses before it, from epoch index ``first`` on."""
    ratios = [losses[e] / float(np.median(losses[:e])) for e in range(max(first, 1), len(losses))]
    return round(max(ratios), 3) if ratios else None


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = compute_dtype_for(device)
    model, model_name = build(args, device)
    train_set, val_set, volumes = studies(args)
    settings = TrainSettings(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        clips_per_step=args.clips_per_step,
        patience=args.patience,
        clip_length=8,
        max_objects=3,
        lr=args.lr,
        lr_image_encoder=args.lr_image_encoder,
        grad_clip=args.grad_clip,
        train_parts=args.train_parts,
        loss=args.loss,
        spike_factor=args.spike_factor,
        warmup_fraction=args.warmup_fraction,
        p_box=1.0,
        seed=args.seed,
        publish_max_overlap_rise=1.0,
    )
    clips_per_step = clips_per_step_on(device, args.clips_per_step)
    base = {
        "model": model_name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "train_parts": args.train_parts,
        "loss": args.loss,
        "clips_per_step": clips_per_step,
        "peak_lr": scaled_lr(args.lr, clips_per_step, 1),
        "grad_clip": args.grad_clip,
        "spike_factor": args.spike_factor,
        "volumes": volumes,
    }
    deadline = time.time() + 60 * args.minutes
    started, cpu0 = time.time(), time.process_time()

    def emit(line: dict) -> None:
        clock = {"elapsed_s": round(time.time() - started, 1), "process_cpu_s": round(time.process_time() - cpu0, 1)}
        text = json.dumps({**base, **line, **clock, "load_average": [round(x, 2) for x in os.getloadavg()]})
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")

    def on_epoch(report, result) -> None:
        emit(
            {
                "epoch": report.epoch,
                "train_loss": round(report.train_loss, 4),
                "max_step_loss_over_median": report.max_loss_ratio,
                "skipped_steps": report.skipped_steps,
                "rollbacks": report.rollbacks,
                "val_dice": round(report.val_dice, 4),
                "val_nsd": round(report.val_nsd, 4),
                "val_other_overlap": None if report.val_other_overlap is None else round(report.val_other_overlap, 4),
                "train_slices_per_s": report.slices_per_second,
                "lr": report.lr,
            }
        )

    result = train(
        model, train_set, val_set, settings, device, dtype, lambda m, r: None, on_epoch,
        should_stop=lambda: time.time() > deadline,
    )  # fmt: skip
    losses = [e.train_loss for e in result.epochs]
    warmup_epochs = math.ceil(args.warmup_fraction * args.epochs)  # the epochs the learning-rate warm-up spans
    ratio = loss_over_running_median(losses, warmup_epochs)
    emit(
        {
            "summary": True,
            "minutes": args.minutes,
            "initial_val_dice": round(result.initial["dice"], 4),
            "best_val_dice": round(result.best_dice, 4),
            "best_epoch": result.best_epoch,
            "epochs": len(result.epochs),
            "warmup_epochs": warmup_epochs,
            "stopped_early": result.stopped_early,
            "max_epoch_loss_over_running_median_after_warmup": ratio,
            "never_above_twice_the_running_median": ratio is None or ratio <= 2.0,
            "max_step_loss_over_median_after_warmup": max(
                (e.max_loss_ratio for e in result.epochs[warmup_epochs:]), default=None
            ),
            "skipped_steps": result.skipped_steps,
            "rollbacks": result.rollbacks,
            "mean_train_slices_per_s": round(float(np.mean([e.slices_per_second for e in result.epochs])), 2)
            if result.epochs
            else None,
        }
    )


if __name__ == "__main__":
    main()
