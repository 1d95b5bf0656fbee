"""Does "stop where the object ends" help? Train a MedSAM2-shaped model from random weights on generated
volumes whose objects end mid-volume (some continue into a dimmer neighbouring structure, the situation
where SAM2 over-segments), then propagate held-out volumes from a box on each object's largest slice with
and without the stop rule. The model is trained once per ``--p-cross-end`` value (the share of training
clips that run past an object's end: 0 is uniform clip starts). One JSON line per setting; ratios against
the rule-off baseline of the same model in the same run.

    python bench/stop_rule.py --out bench/results/stop_rule_cpu.jsonl              # CPU, ~25 min
    python bench/stop_rule.py --image-size 512 --minutes 10 --device cuda          # GPU
    python bench/stop_rule.py --init tests/fixtures/reference_sam2.pt \
        --model-config apps/medsam2/model/configs/reference_sam2.yaml --data synthetic --val-studies 20   # a checkpoint

Measured per setting: voxels labelled on slices past the object's true end (overshoot), all false-positive
voxels, Dice, slices with a mask past the end, tracking steps and tracking time; per model, the object
score on slices inside the object and past its end (what the rule reads). With ``--init`` a checkpoint is measured
instead of training one, on ``--data synthetic`` (lib/training/synthetic.py's held-out volumes: several objects,
each ending inside the volume) or ``ending``; then the rule's precision at the end of each object is measured too:
of the slices the rule emptied (masked with the rule off, empty with it on), the share past the object's true end
(``end_precision``: 1.0 means it never cut into an object), and of the masked slices past the end, the share it
emptied (``end_recall``).
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

from lib.engine.checkpoints import (  # noqa: E402
    MEDSAM2_CONFIG,
    build_model,
    image_size_overrides,
    load_model,
    resolve_checkpoint,
)
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.engine.propagation import StopRule, propagate_volume  # noqa: E402
from lib.engine.volume_session import VolumeSession  # noqa: E402
from lib.training.data import Study  # noqa: E402
from lib.training.loop import train  # noqa: E402
from lib.training.metrics import dice_score  # noqa: E402
from lib.training.settings import TrainSettings  # noqa: E402
from lib.training.synthetic import held_out_studies  # noqa: E402
from lib.training.validation import key_slice_prompts  # noqa: E402


def ending_object_study(seed: int, slices: int, size: int) -> Study:
    """One bright ellipsoid (label 1) covering 25-45% of the slices somewhere mid-volume; in half of the
    volumes a dimmer tube continues from its end at the same place (a neighbouring structure)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(np.arange(slices), np.arange(size), np.arange(size), indexing="ij")
    image = rng.normal(60, 25, (slices, size, size))
    label = np.zeros(image.shape, np.uint8)
    half = rng.uniform(0.125, 0.225) * slices
    ck = rng.uniform(half + 2, slices - half - 2)
    cj, ci = rng.uniform(0.3, 0.7, 2) * size
    rj, ri = rng.uniform(0.1, 0.2, 2) * size
    inside = ((k - ck) / half) ** 2 + ((j - cj) / rj) ** 2 + ((i - ci) / ri) ** 2 <= 1
    if rng.random() < 0.5:
        beyond = (k > ck + half) if rng.random() < 0.5 else (k < ck - half)
        tube = beyond & (((j - cj) / (0.6 * rj)) ** 2 + ((i - ci) / (0.6 * ri)) ** 2 <= 1)
        image[tube] += 60
    image[inside] += 120
    label[inside] = 1
    return Study(f"end{seed}", np.clip(image, 0, 255).astype(np.uint8), label, (2.5, 1.0, 1.0))


def measure(model, studies: list[Study], rule: StopRule | None, device, dtype) -> tuple[dict, dict]:
    """Propagation quality with ``rule``; and the object scores inside / past the object (rule off only)."""
    overshoot = fp = slices_past = steps = 0
    dices, track = [], 0.0
    inside_scores: list[float] = []
    past_scores: list[float] = []
    for study in studies:
        prompts = key_slice_prompts(study.label)
        session = VolumeSession(study.frames, model, device, dtype, dtype or torch.float32)
        session.encode(range(study.frames.shape[0]))  # encoding is the same with or without the rule
        t0 = time.perf_counter()
        result = propagate_volume(session, prompts, stop_rule=rule)
        track += time.perf_counter() - t0
        steps += result.steps
        for prompt in prompts:
            pred = result.binary_mask(prompt.label)
            gt = study.label == prompt.label_value
            outside = ~gt.reshape(gt.shape[0], -1).any(1)
            for k, score in result.object_scores[prompt.label].items():
                (past_scores if outside[k] else inside_scores).append(score)
            overshoot += int(pred[outside].sum())
            slices_past += int(pred[outside].reshape(int(outside.sum()), -1).any(1).sum())
            fp += int((pred & ~gt).sum())
            dices.append(dice_score(pred, gt))
    scores = {
        "object_score_inside_median": round(float(np.median(inside_scores)), 3),
        "object_score_past_end_median": round(float(np.median(past_scores)), 3) if past_scores else None,
        "past_end_slices_scored_below_0": round(float(np.mean(np.array(past_scores) < 0)), 3) if past_scores else None,
    }
    return {
        "overshoot_voxels": overshoot,
        "slices_with_mask_past_end": slices_past,
        "false_positive_voxels": fp,
        "dice": round(float(np.mean(dices)), 4),
        "tracking_steps": steps,
        "tracking_seconds": round(track, 3),
    }, scores


def end_precision(model, studies: list[Study], rule: StopRule, device, dtype) -> dict:
    """Where the rule ends an object: of the slices it empties (masked with the rule off, empty with it on), the
    share past the object's true extent (precision), and of the masked slices past the extent, the share it
    empties (recall); per object, whether it cut into the object (emptied a slice holding it)."""
    removed_past = removed_inside = masked_past = objects = cut = 0
    for study in studies:
        prompts = key_slice_prompts(study.label)
        session = VolumeSession(study.frames, model, device, dtype, dtype or torch.float32)
        off = propagate_volume(session, prompts)
        on = propagate_volume(session, prompts, stop_rule=rule)
        for prompt in prompts:
            present = (study.label == prompt.label_value).reshape(study.label.shape[0], -1).any(1)
            was = off.binary_mask(prompt.label).reshape(len(present), -1).any(1)
            now = on.binary_mask(prompt.label).reshape(len(present), -1).any(1)
            removed = was & ~now
            removed_past += int((removed & ~present).sum())
            removed_inside += int((removed & present).sum())
            masked_past += int((was & ~present).sum())
            objects += 1
            cut += bool((removed & present).any())
    removed = removed_past + removed_inside
    return {
        "objects": objects,
        "slices_emptied": removed,
        "slices_emptied_past_end": removed_past,
        "end_precision": round(removed_past / removed, 4) if removed else None,
        "end_recall": round(removed_past / masked_past, 4) if masked_past else None,
        "masked_slices_past_end_rule_off": masked_past,
        "objects_cut_short": cut,
    }


def train_model(args, p_cross_end: float, train_set, val_set, device, dtype):
    """A MedSAM2-shaped model trained from random weights for ``args.minutes``; the best validated weights."""
    overrides = image_size_overrides(args.image_size) if args.image_size != 512 else []
    torch.manual_seed(0)
    model = build_model(MEDSAM2_CONFIG, device, overrides)
    settings = TrainSettings(
        epochs=10_000,
        steps_per_epoch=args.steps_per_epoch,
        clip_length=6,
        max_objects=1,
        lr=3e-3,
        grad_clip=1.0,
        p_box=1.0,
        p_cross_end=p_cross_end,
    )
    deadline = time.perf_counter() + args.minutes * 60
    best = {}

    def keep_best(m, report):
        best.update({k: v.detach().clone() for k, v in m.state_dict().items()})

    t0 = time.perf_counter()
    stop = lambda: time.perf_counter() > deadline  # noqa: E731
    trained = train(model, train_set, val_set[:2], settings, device, dtype, keep_best, should_stop=stop)
    if best:
        model.load_state_dict(best)
    model.eval()
    minutes = round((time.perf_counter() - t0) / 60, 1)
    return model, f"hiera-t {args.image_size}, trained {minutes} min from random", trained.best_dice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=64, help="in-plane size of the generated volumes")
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--train-studies", type=int, default=16)
    ap.add_argument("--val-studies", type=int, default=12)
    ap.add_argument("--minutes", type=float, default=8.0, help="training time from random weights, per model")
    ap.add_argument("--steps-per-epoch", type=int, default=40)
    ap.add_argument("--p-cross-end", default="0,0.5", help="one model per value")
    ap.add_argument("--patience", default="1,2,3,5")
    ap.add_argument("--min-object-score", type=float, default=0.0)
    ap.add_argument("--init", default="", help="measure this checkpoint instead of training models")
    ap.add_argument("--model-config", default="", help="the Hydra config of --init")
    ap.add_argument("--data", choices=("ending", "synthetic"), default="ending", help="held-out volumes (see above)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = compute_dtype_for(device)
    train_set = [ending_object_study(s, args.slices, args.size) for s in range(args.train_studies)]
    if args.data == "synthetic":
        val_set = held_out_studies(args.val_studies)
    else:
        val_set = [ending_object_study(1000 + s, args.slices, args.size) for s in range(args.val_studies)]
    shape = "x".join(str(n) for n in val_set[0].frames.shape)
    lines = []
    for p_cross_end in [float(v) for v in args.p_cross_end.split(",") if v] if not args.init else [None]:
        if args.init:
            model = load_model(resolve_checkpoint(args.init, config=args.model_config or None), device).eval()
            name, val_dice = Path(args.init).name, float("nan")
        else:
            model, name, val_dice = train_model(args, p_cross_end, train_set, val_set, device, dtype)
        base = {
            "model": name,
            "p_cross_end": p_cross_end,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "val_dice_during_training": round(val_dice, 4),
            "volumes": f"{args.val_studies} x {shape} ({args.data})",
        }
        measure(model, val_set[:1], None, device, dtype)  # warm-up: the first propagation pays one-off costs
        off, scores = measure(model, val_set, None, device, dtype)
        lines.append({**base, "setting": "no stop rule", **off, **scores})
        for patience in [int(p) for p in args.patience.split(",") if p]:
            rule = StopRule(args.min_object_score, patience)
            on, _ = measure(model, val_set, rule, device, dtype)
            ratios = {
                "overshoot_vs_off": round(on["overshoot_voxels"] / max(off["overshoot_voxels"], 1), 3),
                "tracking_time_vs_off": round(on["tracking_seconds"] / max(off["tracking_seconds"], 1e-9), 3),
                "dice_minus_off": round(on["dice"] - off["dice"], 4),
            }
            setting = f"stop rule: score < {args.min_object_score} for {patience}"
            ends = end_precision(model, val_set, rule, device, dtype) if args.init else {}
            lines.append({**base, "setting": setting, **on, **ratios, **ends})
        for line in lines[-(1 + len(args.patience.split(","))) :]:
            print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
