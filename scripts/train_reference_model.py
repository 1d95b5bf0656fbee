"""Train the reference model from random init: the SAM2 architecture of
``apps/medsam2/model/configs/reference_sam2.yaml`` on generated multi-object volumes (``lib/training/synthetic.py``)
with the app's own training loop (``lib/training/loop.py``: clips of consecutive slices, a simulated annotator's
box or clicks on one object among similar ones, SAM2's loss, validation by propagation both ways from a key-slice
box on held-out volumes). The best epoch is saved as ``{"model": state_dict}``. One JSON line per epoch and a
summary (wall time, process CPU time, load average) go to stdout and ``--log``. See docs/reference_model.md.

    python scripts/train_reference_model.py --out tests/fixtures/reference_sam2.pt --log train.jsonl   # 2 CPU cores
    python scripts/train_reference_model.py --device cuda --out /tmp/reference_sam2.pt                 # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))

from lib.engine.checkpoints import build_model, load_state_dict_strict, save_checkpoint  # noqa: E402
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.training.loop import train  # noqa: E402
from lib.training.settings import TrainSettings  # noqa: E402
from lib.training.synthetic import TRAIN_SEEDS, VolumeRecipe, generate_studies, validation_studies  # noqa: E402

REFERENCE_CONFIG = REPO / "apps" / "medsam2" / "model" / "configs" / "reference_sam2.yaml"


@dataclass(frozen=True)
class Stage:
    """A stage of the recipe: clips of ``slices`` consecutive slices, ``clips_per_step`` per optimiser step, ``steps``
    steps at learning rate ``lr`` (per clip, scaled by sqrt(clips_per_step)), validated ``epochs`` times."""

    name: str
    slices: int
    clips_per_step: int
    steps: int
    lr: float
    epochs: int

    @classmethod
    def parse(cls, text: str) -> Stage:
        name, slices, clips, steps, lr, epochs = text.split(":")
        return cls(name, int(slices), int(clips), int(steps), float(lr), int(epochs))


# 1: segment the prompted object on single slices (cheap: no tracking); 2: track it over short clips (the memory
# attention learns which object the memory holds); 3: clips of 8 slices (a full memory bank, objects that end)
DEFAULT_STAGES = ("slices:1:4:2500:3e-4:1", "short_clips:3:8:1000:3e-4:2", "clips:8:4:600:1.5e-4:3")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where the best epoch's checkpoint is written")
    ap.add_argument("--config", type=Path, default=REFERENCE_CONFIG)
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint instead of random init")
    ap.add_argument("--log", type=Path, default=None, help="JSON lines: one per epoch, then a summary")
    ap.add_argument("--stage-dir", type=Path, default=None, help="also save the model at the end of each stage here")
    ap.add_argument("--seed", type=int, default=0, help="model init, clip sampling and prompts")
    ap.add_argument("--train-volumes", type=int, default=300)
    ap.add_argument("--val-volumes", type=int, default=4)
    ap.add_argument(
        "--stage",
        action="append",
        type=Stage.parse,
        help="name:slices:clips_per_step:steps:lr:epochs, repeated (default: " + " ".join(DEFAULT_STAGES) + ")",
    )
    ap.add_argument("--max-objects", type=int, default=3)
    ap.add_argument("--loss", default="dice_ce", choices=("dice_ce", "sam2"))
    ap.add_argument("--warmup-fraction", type=float, default=0.05)
    ap.add_argument("--p-box", type=float, default=0.5, help="share of box prompts (else 1-3 clicks)")
    ap.add_argument("--spike-factor", type=float, default=5.0, help="the spike guard's (lib/training/spike_guard.py)")
    ap.add_argument("--minutes", type=float, default=60.0, help="stop after this long (the best epoch is kept)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    args = ap.parse_args()
    args.stage = args.stage or [Stage.parse(text) for text in DEFAULT_STAGES]
    return args


def stage_settings(args: argparse.Namespace, stage: Stage) -> TrainSettings:
    """The whole model trains at one learning rate, with no early stopping and no check of the answers' overlap
    against the model the stage starts from (random weights, or an earlier stage's, which may not track yet: the
    publish guard protects a served model, not this recipe)."""
    return TrainSettings(
        epochs=stage.epochs,
        steps_per_epoch=max(1, stage.steps * stage.clips_per_step // stage.epochs),
        clips_per_step=stage.clips_per_step,
        clip_length=stage.slices,
        max_objects=args.max_objects,
        lr=stage.lr,
        lr_image_encoder=stage.lr,
        warmup_fraction=args.warmup_fraction,
        patience=0,
        feature_cache_mb=0,
        train_parts="all",
        loss=args.loss,
        p_box=args.p_box,
        seed=args.seed,
        publish_max_overlap_rise=1.0,
        spike_factor=args.spike_factor,
    )


class EpochLog:
    """Prints (and appends to ``path``) one JSON line per epoch and the summary, with time and load figures."""

    def __init__(self, path: Path | None, base: dict):
        self.path, self.base = path, base
        self.wall0, self.cpu0 = time.time(), time.process_time()

    def emit(self, line: dict) -> None:
        load = [round(x, 2) for x in os.getloadavg()]
        text = json.dumps({**self.base, **line, **self.clock(), "load_average": load})
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(text + "\n")

    def clock(self) -> dict:
        return {
            "wall_s": round(time.time() - self.wall0, 1),
            "process_cpu_s": round(time.process_time() - self.cpu0, 1),
        }

    def on_epoch(self, report, result) -> None:
        self.emit(
            {
                "epoch": report.epoch,
                "train_loss": round(report.train_loss, 4),
                "val_dice": round(report.val_dice, 4),
                "val_nsd": round(report.val_nsd, 4),
                "val_other_overlap": report.val_other_overlap,
                "skipped_steps": report.skipped_steps,
                "max_loss_ratio": report.max_loss_ratio,
                "lr": report.lr,
                "train_slices_per_s": report.slices_per_second,
                "published": report.published,
            }
        )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = compute_dtype_for(device, args.precision)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or 'x86_64'})"
    log = EpochLog(args.log, {"device": name, "threads": torch.get_num_threads(), "seed": args.seed})
    recipe = VolumeRecipe()
    train_set = generate_studies(TRAIN_SEEDS[: args.train_volumes], recipe)
    val_set = validation_studies(args.val_volumes, recipe)
    log.emit({"generated_volumes": args.train_volumes + args.val_volumes, "recipe": recipe.__dict__})
    torch.manual_seed(args.seed)
    model = build_model(args.config, device)
    if args.init:
        load_state_dict_strict(model, args.init)
    best = {"dice": -1.0}

    def publish(m: torch.nn.Module, report) -> None:
        if report.val_dice > best["dice"]:  # across stages: the best validation Dice so far
            best["dice"] = report.val_dice
            save_checkpoint(m, args.out)

    deadline = time.time() + 60 * args.minutes
    for stage in args.stage:
        settings = stage_settings(args, stage)
        log.base["stage"] = stage.name
        log.emit({"settings": settings.__dict__})
        result = train(
            model, train_set, val_set, settings, device, dtype, publish, log.on_epoch, lambda: time.time() > deadline
        )
        log.emit(
            {
                "stage_done": stage.name,
                "initial_val_dice": round(result.initial["dice"], 4),
                "best_val_dice": round(result.best_dice, 4),
            }
        )
        if args.stage_dir:  # what each stage ended with (to resume from with --init)
            save_checkpoint(model, args.stage_dir / f"{stage.name}.pt")
    log.emit(
        {
            "summary": True,
            "best_val_dice": round(best["dice"], 4),
            "checkpoint": str(args.out),
            "checkpoint_bytes": args.out.stat().st_size if args.out.exists() else None,
        }
    )


if __name__ == "__main__":
    main()
