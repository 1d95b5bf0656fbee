"""Full fine-tuning against LoRA adapters on the same data and the same steps: held-out propagated Dice, seconds
per optimiser step, peak memory, trainable parameters and the size of what a run publishes.

A base model (the MedSAM2 shape, random init) is first trained on generated volumes (``finetune_speed``'s
``generated_study``); each variant then starts from that base and adapts it to a "new site": the same kind of
volumes at half the contrast on a brighter background. A variant is a ``train_parts`` value, optionally with its
own learning rate (``no_image_encoder@1e-3``; default: ``--lr``, ``--lora-lr`` for ``lora``). Every run is its own
process, so its peak RSS (``ru_maxrss``) is its own. One JSON line for the base, then one per variant.

    python bench/adapters_vs_full.py --out bench/results/adapters_cpu.jsonl                      # CPU, ~7-8 min
    python bench/adapters_vs_full.py --image-size 512 --size 128 --slices 32 --pretrain-steps 600 --steps 300 \\
        --device cuda --out bench/results/adapters_gpu.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import JsonLines, device_name, dtype_name, use_repo_paths

use_repo_paths()

from finetune_speed import generated_study  # noqa: E402

from lib.engine.adapters import adapter_parameter_count, save_adapter  # noqa: E402
from lib.engine.checkpoints import (  # noqa: E402
    MEDSAM2_CONFIG,
    build_model,
    image_size_overrides,
    load_state_dict_strict,
    save_checkpoint,
)
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.training.data import Study  # noqa: E402
from lib.training.loop import train  # noqa: E402
from lib.training.settings import TrainSettings  # noqa: E402

# the default variants: full fine-tuning, the default train_parts, LoRA, and the default at LoRA's learning rate
VARIANTS = "all,no_image_encoder,lora,no_image_encoder@1e-3"


def site_study(seed: int, slices: int, size: int) -> Study:
    """The new site's volumes: generated as for the base, at half the contrast on a brighter background (another
    scanner or protocol): the bright objects stand out less, the dark one barely."""
    study = generated_study(seed, slices, size)
    frames = np.clip(study.frames.astype(np.float32) * 0.5 + 90, 0, 255).astype(np.uint8)
    return Study(f"site{seed}", frames, study.label, study.spacing_kji)


def settings_for(args: argparse.Namespace, parts: str, steps: int, lr: float) -> TrainSettings:
    values = dict(
        epochs=1,
        steps_per_epoch=steps,
        clip_length=args.clip_length,
        max_objects=args.max_objects,
        lr=lr,
        lr_image_encoder=args.lr_image_encoder,
        grad_clip=1.0,
        train_parts=parts,
        p_box=1.0,
        lora_rank=args.rank,
        lora_alpha=args.alpha,
    )
    if "clips_per_step" in {f.name for f in dataclasses.fields(TrainSettings)}:
        values["clips_per_step"] = 1  # one clip per optimiser step, for every variant
    return TrainSettings(**values)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def new_model(args: argparse.Namespace) -> torch.nn.Module:
    """The MedSAM2 shape at ``args.image_size``, seeded random weights, on the CPU."""
    overrides = image_size_overrides(args.image_size) if args.image_size != 512 else []
    torch.manual_seed(0)
    return build_model(MEDSAM2_CONFIG, "cpu", overrides)


def pretrain(args: argparse.Namespace, device: torch.device) -> dict:
    """Train the base on the first site's volumes and save it to ``args.base``."""
    model = new_model(args).to(device)
    studies = [generated_study(s, args.slices, args.size) for s in range(args.train_studies)]
    settings = settings_for(args, "all", args.pretrain_steps, args.pretrain_lr)
    held_out = [generated_study(2000 + s, args.slices, args.size) for s in range(args.val_studies)]
    t0 = time.perf_counter()
    result = train(model, studies, held_out, settings, device, compute_dtype_for(device), lambda m, r: None)
    save_checkpoint(model, Path(args.base))
    return {
        "role": "base",
        "pretrain_steps": args.pretrain_steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "val_dice_own_site": round(result.epochs[-1].val_dice, 4),  # held out, the base's own kind of volume
    }


def adapt(args: argparse.Namespace, device: torch.device) -> dict:
    """Fine-tune the base on the new site with ``args.variant``; measure it."""
    model = new_model(args)
    load_state_dict_strict(model, Path(args.base))
    model = model.to(device)
    rss_loaded = peak_rss_mb()
    train_set = [site_study(100 + s, args.slices, args.size) for s in range(args.train_studies)]
    val_set = [site_study(1000 + s, args.slices, args.size) for s in range(args.val_studies)]
    parts, _, lr = args.variant.partition("@")
    lora = parts == "lora"
    settings = settings_for(args, parts, args.steps, float(lr) if lr else args.lora_lr if lora else args.lr)
    step_starts: list[float] = []

    def should_stop() -> bool:  # asked once before every optimiser step
        step_starts.append(time.perf_counter())
        return False

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(
        model, train_set, val_set, settings, device, compute_dtype_for(device), lambda m, r: None, None, should_stop
    )
    step_seconds = np.diff(step_starts[: args.steps])  # the last step ends before validation: not timed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = Path(args.base).with_name(f"{parts}_{settings.lr:g}.pt")
    if lora:
        assert trainable == adapter_parameter_count(model)
        save_adapter(model, saved, "base", args.rank, args.alpha)
    else:
        save_checkpoint(model, saved)
    return {
        "variant": args.variant,
        "lr": settings.lr,
        "lr_image_encoder": settings.lr_image_encoder if parts == "all" else None,
        "lora_rank": args.rank if lora else None,
        "lora_alpha": args.alpha if lora else None,
        "steps": args.steps,
        "val_dice_before": round(result.initial["dice"], 4),
        "val_dice_after": round(result.epochs[-1].val_dice, 4) if result.epochs else None,
        "val_nsd_after": round(result.epochs[-1].val_nsd, 4) if result.epochs else None,
        "seconds_per_step": round(float(np.median(step_seconds)), 3),
        "seconds_per_step_mean": round(float(np.mean(step_seconds)), 3),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_after_load": rss_loaded,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "trainable_params": trainable,
        "total_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "saved_bytes": saved.stat().st_size,
        "saved": "adapter file" if lora else "full checkpoint",
    }


def child(args: argparse.Namespace, role: list[str]) -> dict:
    """Run one role in its own process (its own peak RSS); its last stdout line is its JSON."""
    argv = [sys.executable, __file__, *role, *sys.argv[1:]]
    if args.out:  # only the parent writes the results
        argv = [a for a in argv if a != args.out and not a.startswith("--out")]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(role)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--size", type=int, default=48, help="in-plane size of the generated volumes")
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--train-studies", type=int, default=8)
    ap.add_argument("--val-studies", type=int, default=3)
    ap.add_argument("--clip-length", type=int, default=4)
    ap.add_argument("--max-objects", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=70)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps of every variant (one clip each)")
    ap.add_argument("--lr", type=float, default=3e-4, help="full fine-tuning")
    ap.add_argument("--lr-image-encoder", type=float, default=1e-4, help="train_parts all")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA (adapters usually want a higher one)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--variants", default=VARIANTS, help="train_parts[@lr],...")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    ap.add_argument("--role", choices=("base", "variant"), help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.role:
        line = pretrain(args, device) if args.role == "base" else adapt(args, device)
        print(json.dumps(line), flush=True)
        return

    common = {
        "model": f"hiera-t {args.image_size} (MedSAM2 shape), base trained {args.pretrain_steps} steps from random",
        "device": device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name(compute_dtype_for(device)),
        "torch_threads": torch.get_num_threads(),
        "volumes": f"{args.train_studies} train + {args.val_studies} held out, {args.slices}x{args.size}x{args.size}, "
        "the base's at half the contrast",
        "clip": f"{args.clip_length} slices, {args.max_objects} objects, box prompts",
    }
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = str(Path(tmp) / "base.pt")
        runs = [["--role", "base"]] + [["--role", "variant", "--variant", v] for v in args.variants.split(",")]
        out = JsonLines(args.out, **common)
        for run in runs:
            out.emit(child(args, [*run, "--base", base]))
    print(f"total {time.time() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
