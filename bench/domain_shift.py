"""Fine-tuning on a shifted domain, judged by the CVPR 2025 interactive protocol: does a run on a new kind of volume
make the model better there without making it worse where it was good?

The model (the reference model by default) is fine-tuned with the app's training loop (lib/training/loop.py, its
publish guard watching a reference set of the ORIGINAL domain: an epoch whose Dice there drops by more than
``publish_max_drop`` is not published) on generated volumes of a shifted domain (``SHIFTED``: smaller objects
of lower contrast, with unlabelled blobs brighter than them). Before
and after, the protocol (lib/training/interactive_protocol.py: a box, then five clicks at the centre of the largest
error) runs on held-out volumes of both domains, through the app's segmenter in this process; one JSON line per
(model, domain, click mode) with the protocol's figures, then a summary line with the changes. ``--replay`` mixes
original-domain volumes into the training set, as a site's datastore keeps its earlier labels (0: the new domain
alone).

    python bench/domain_shift.py --out bench/results/domain_shift_cpu.jsonl          # CPU, reference model, ~15 min
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))
sys.path.insert(0, str(REPO / "tests"))

from lib.engine.checkpoints import load_model, resolve_checkpoint  # noqa: E402
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.engine.preprocessing import parse_window  # noqa: E402
from lib.engine.prompts import LabelMap  # noqa: E402
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings  # noqa: E402
from lib.engine.volume_session import SessionCache  # noqa: E402
from lib.training.data import Study  # noqa: E402
from lib.training.interactive_protocol import run_case, summarise  # noqa: E402
from lib.training.loop import train  # noqa: E402
from lib.training.settings import TrainSettings  # noqa: E402
from lib.training.synthetic import (  # noqa: E402
    TRAIN_SEEDS,
    VALIDATION_SEEDS,
    VolumeRecipe,
    generate_studies,
    held_out_studies,
)
from sam2_testing import REFERENCE_CHECKPOINT, REFERENCE_CONFIG  # noqa: E402

ORIGINAL = VolumeRecipe()
# lower contrast (objects 125 on 95, not 165 on 85), unlabelled blobs brighter than the objects (150, not 35),
# smaller objects (semi-axes 4.5-8 voxels, not 6-11) spanning fewer slices (7-16, not 9-22)
SHIFTED = replace(
    ORIGINAL,
    object_mean=125.0,
    background_mean=95.0,
    noise_sd=18.0,
    distractor_mean=150.0,
    radius=(4.5, 8.0),
    extent=(7, 16),
)
WINDOW = "127.5,255"  # the generated volumes are uint8: served as they are


class Provider:
    """What the segmenter reads from lib.engine.model_provider.ModelProvider: one model, on this device."""

    checkpoint = type("Checkpoint", (), {"name": "bench", "is_random": False})()

    def __init__(self, model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype | None):
        self.model, self.device, self.compute_dtype = model, device, compute_dtype

    def get(self) -> tuple[torch.nn.Module, int]:
        return self.model, 1


def protocol(model, studies: list[Study], folder: Path, clicks_as: str, device, dtype) -> dict:
    """The interactive protocol on ``studies`` through the app's segmenter; its summary."""
    labels = {f"object_{v}": v for v in range(1, 8)}
    settings = SegmenterSettings(window=parse_window(WINDOW), labels=LabelMap(labels))
    segmenter = MedSAM2Segmenter(Provider(model, device, dtype), settings, SessionCache(2, 1 << 30))
    results = []
    for study in studies:
        path = folder / f"{study.name}.nii.gz"
        if not path.exists():
            image = sitk.GetImageFromArray(study.frames)
            image.SetSpacing(tuple(float(s) for s in reversed(study.spacing_kji)))
            sitk.WriteImage(image, str(path))

        def ask(params: dict, path=str(path), client=f"{clicks_as}-{study.name}-{id(model)}") -> np.ndarray:
            return segmenter.segment_3d(path, {**params, "client_id": client})[0]

        names = {v: f"object_{v}" for v in range(1, 8)}
        results.append(run_case(ask, study.label, study.spacing_kji, names, study.name, clicks_as=clicks_as))
    summary = summarise(results)
    box = [r.dice[0] for r in results]
    return {**summary, "box_dice": round(float(np.mean(box)), 4), "box_dice_sd": round(float(np.std(box)), 4)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(REFERENCE_CHECKPOINT))
    ap.add_argument("--model-config", default=str(REFERENCE_CONFIG))
    ap.add_argument("--train-studies", type=int, default=12)
    ap.add_argument(
        "--replay",
        type=int,
        default=6,
        help="original-domain volumes trained on too (a site's datastore keeps its earlier labels)",
    )
    ap.add_argument("--val-studies", type=int, default=3)
    ap.add_argument("--reference-studies", type=int, default=4, help="of the original domain, for the publish guard")
    ap.add_argument("--test-studies", type=int, default=8, help="held out, per domain, for the protocol")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps-per-epoch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1.5e-4)
    ap.add_argument("--lr-image-encoder", type=float, default=1e-4)
    ap.add_argument("--train-parts", default="all")
    ap.add_argument("--loss", default="dice_ce")
    ap.add_argument("--clicks-as", default="refine,correction")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="")
    return ap.parse_args()


def fine_tune(model, args, device, dtype, emit) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` fine-tuned on the shifted domain; the published epoch's weights (or none)."""
    tuned = copy.deepcopy(model).train()
    settings = TrainSettings(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        clip_length=8,
        max_objects=3,
        lr=args.lr,
        lr_image_encoder=args.lr_image_encoder,
        train_parts=args.train_parts,
        loss=args.loss,
        patience=0,
        seed=0,
    )
    train_set = generate_studies(TRAIN_SEEDS[50_000 : 50_000 + args.train_studies], SHIFTED)
    train_set += generate_studies(TRAIN_SEEDS[60_000 : 60_000 + args.replay], ORIGINAL)
    val_set = generate_studies(VALIDATION_SEEDS[50_000 : 50_000 + args.val_studies], SHIFTED)
    reference = held_out_studies(args.reference_studies, ORIGINAL, start=900)
    published: dict = {}

    def publish(m, report) -> None:
        published.update({k: v.detach().clone() for k, v in m.state_dict().items()})

    def on_epoch(report, result) -> None:
        emit(
            {
                "kind": "epoch",
                "epoch": report.epoch,
                "train_loss": round(report.train_loss, 4),
                "val_dice_shifted": round(report.val_dice, 4),
                "reference_dice_original": report.reference_dice,
                "published": report.published,
                "not_published": report.not_published,
                "max_step_loss_over_median": report.max_loss_ratio,
                "skipped_steps": report.skipped_steps,
            }
        )

    result = train(tuned, train_set, val_set, settings, device, dtype, publish, on_epoch, reference_studies=reference)
    run = {
        "initial_val_dice_shifted": round(result.initial["dice"], 4),
        "best_val_dice_shifted": round(result.best_dice, 4),
        "best_epoch": result.best_epoch,
        "published": result.published,
        "reference_dice_before": result.reference_before,
        "reference_dice_published": result.reference_dice,
        "not_published": result.not_published,
    }
    if published:
        tuned.load_state_dict(published)
    return (tuned if published else copy.deepcopy(model)).eval(), run


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = compute_dtype_for(device)
    model = load_model(resolve_checkpoint(args.checkpoint, config=args.model_config), device).eval()
    test = {
        "original": held_out_studies(args.test_studies, ORIGINAL, start=800),
        "shifted": held_out_studies(args.test_studies, SHIFTED, start=800),
    }
    base = {"checkpoint": Path(args.checkpoint).name, "device": f"{args.device}, {os.cpu_count()} cores"}
    started = time.time()

    def emit(line: dict) -> None:
        clock = {"elapsed_s": round(time.time() - started, 1), "load_average": [round(x, 2) for x in os.getloadavg()]}
        text = json.dumps({**base, **line, **clock})
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")

    emit({"kind": "config", **{k: str(v) for k, v in vars(args).items()}, "shifted": str(SHIFTED)})
    modes = [m for m in args.clicks_as.split(",") if m]
    scores: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("before", "after"):
            if stage == "after":
                model, run = fine_tune(model, args, device, dtype, emit)
                emit({"kind": "fine_tune", **run})
            for domain, studies in test.items():
                folder = Path(tmp) / domain  # the domains' studies share their names (the same seeds)
                folder.mkdir(exist_ok=True)
                for mode in modes:
                    s = scores[(stage, domain, mode)] = protocol(model, studies, folder, mode, device, dtype)
                    emit({"kind": "protocol", "model": stage, "domain": domain, "clicks_as": mode, **s})
    for domain in test:
        for mode in modes:
            b, a = scores[("before", domain, mode)], scores[("after", domain, mode)]
            change = {k: round(a[k] - b[k], 4) for k in ("dice_auc", "final_dice", "box_dice", "nsd_auc")}
            emit({"kind": "change", "domain": domain, "clicks_as": mode, **change})


if __name__ == "__main__":
    main()
