"""Which scribble encoding gives better masks: scribbles as clicks sampled along the strokes (``points``) or as
SAM2's previous-mask input (``mask``)? Decides the default of the segmenter setting ``scribble_mode``.

A model with a learnable signal: a real SAM2/MedSAM2 checkpoint (``--checkpoint``, loaded by the app's loader),
or else (the default: no weights can be downloaded here) the MedSAM2 architecture at 128 input (the config the
server tests use; a 3-pixel stroke on a 128^2 slice then shrinks in SAM2's mask input as on a 512^2 CT slice at
MedSAM2's 512) fine-tuned from random weights for ``--train-minutes`` on generated volumes (finetune_speed.py's
three ellipsoids) with the app's trainer: boxes or clicks as prompts, and correction clicks fed back with the
previous mask as SAM2 trains (so the decoder's mask input is trained too).

Held-out volumes from other seeds; per object a key slice through it and prompts simulated from its true mask:
``box`` (the baseline), ``scribbles_points`` / ``scribbles_mask`` (a foreground scribble along the mask's medial
axis: its skeleton's longest path, or the principal axis through its deepest pixel where that is longer, plus a
background scribble just outside the object for every other case), ``box_scribbles_points`` and
``box_scribbles_mask`` (the box with the same scribbles), and the control ``box_elsewhere`` (the box of another
object of the volume): a model that reads its prompts scores far lower with it. Each prompt is resolved by the
engine (``resolve_drawn``) and decoded by ``segment_key_slice``; 2D Dice against the true mask on that slice.
One JSON line per prompt kind (mean Dice, ratio to the box baseline of the same run) and a verdict line, which
names a winner only if the control shows the model reads its prompts and the paired difference is significant.

    python bench/scribble_prompts.py                                  # CPU, ~4.5 min: 4 min of training
    python bench/scribble_prompts.py --checkpoint apps/medsam2/model/MedSAM2_latest.pt --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque

import numpy as np
import torch
from common import REPO, JsonLines, device_name, dtype_name, use_repo_paths
from scipy import ndimage
from skimage.measure import find_contours
from skimage.morphology import skeletonize

use_repo_paths()

from finetune_speed import generated_study  # noqa: E402  (the generated volumes, reused)

from lib.engine.checkpoints import (  # noqa: E402
    MEDSAM2_CONFIG,
    build_model,
    image_size_overrides,
    load_model,
    resolve_checkpoint,
)
from lib.engine.mask_prompts import Strokes, resolve_drawn  # noqa: E402
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.engine.prompts import KeySlicePrompt  # noqa: E402
from lib.engine.propagation import segment_key_slice, upsample_logits  # noqa: E402
from lib.engine.volume_session import VolumeSession  # noqa: E402
from lib.training.loop import train  # noqa: E402
from lib.training.metrics import dice_score  # noqa: E402
from lib.training.settings import TrainSettings  # noqa: E402

# prompt kind -> (box?, scribbles?, scribble mode); "box_elsewhere" is the box of another object of the volume,
# drawn on this slice: a control (a model that reads its prompts scores far lower with it than with "box")
KINDS = {
    "box": (True, False, "points"),
    "box_elsewhere": (True, False, "points"),
    "scribbles_points": (False, True, "points"),
    "scribbles_mask": (False, True, "mask"),
    "box_scribbles_points": (True, True, "points"),
    "box_scribbles_mask": (True, True, "mask"),
}
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _farthest(pixels: set[tuple[int, int]], start: tuple[int, int]) -> tuple[tuple[int, int], dict]:
    """Breadth-first search over 8-connected pixels: the farthest pixel from ``start`` and the parent links."""
    parent = {start: start}
    queue, last = deque([start]), start
    while queue:
        last = queue.popleft()
        for dy, dx in NEIGHBOURS:
            nxt = (last[0] + dy, last[1] + dx)
            if nxt in pixels and nxt not in parent:
                parent[nxt] = last
                queue.append(nxt)
    return last, parent


def skeleton_path(mask: np.ndarray) -> np.ndarray:
    """The longest path through the mask's skeleton (largest piece), ordered, as (x, y) pixels."""
    skeleton = skeletonize(mask)
    labelled, n = ndimage.label(skeleton, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros((0, 2))
    largest = 1 + int(np.argmax(ndimage.sum(skeleton, labelled, range(1, n + 1))))
    pixels = set(zip(*np.nonzero(labelled == largest), strict=True))
    end, _ = _farthest(pixels, next(iter(pixels)))
    other, parent = _farthest(pixels, end)
    path = [other]
    while path[-1] != end:
        path.append(parent[path[-1]])
    return np.array([(x, y) for y, x in path], dtype=np.float64)


def axis_stroke(mask: np.ndarray) -> np.ndarray:
    """A stroke along the mask's principal axis through its deepest pixel, kept 2 pixels inside the mask (for a
    roundish mask, whose skeleton is a dot)."""
    inner = ndimage.binary_erosion(mask, iterations=2)
    inner = inner if inner.any() else mask
    ys, xs = np.nonzero(mask)
    _, vectors = np.linalg.eigh(np.cov(np.stack([xs, ys])))
    direction = vectors[:, -1]
    y0, x0 = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(mask))), mask.shape)
    centre = np.array([x0, y0], dtype=np.float64)
    ends = []
    for sign in (-1, 1):
        t = 0.0
        while True:
            x, y = np.rint(centre + sign * (t + 1) * direction).astype(int)
            if not (0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and inner[y, x]):
                break
            t += 1
        ends.append(centre + sign * t * direction)
    return np.array(ends)


def _length(stroke: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(stroke, axis=0), axis=1).sum()) if len(stroke) > 1 else 0.0


def foreground_scribble(mask: np.ndarray) -> np.ndarray:
    """A polyline along the mask's medial axis, a vertex every 4 pixels (as a mouse drag records it); the
    principal-axis stroke instead where that is longer (a roundish object's skeleton is a few pixels)."""
    path = skeleton_path(mask)
    keep = list(range(0, len(path), 4)) + ([len(path) - 1] if (len(path) - 1) % 4 else [])
    skeleton = path[keep]
    axis = axis_stroke(mask)
    return skeleton if _length(skeleton) >= _length(axis) else axis


def background_scribble(mask: np.ndarray, rng: np.random.Generator, gap: int = 3) -> np.ndarray:
    """An arc of 40% of the outline of the mask dilated by ``gap`` pixels: a stroke just outside the object."""
    grown = ndimage.binary_dilation(mask, iterations=gap)
    outline = max(find_contours(np.pad(grown, 1).astype(float), 0.5), key=len) - 1  # (row, col), unpadded
    rows, cols = mask.shape
    xy = np.stack([np.clip(outline[:, 1], 0, cols - 1), np.clip(outline[:, 0], 0, rows - 1)], axis=1)
    n = len(xy)
    start = int(rng.integers(n))
    arc = xy[(start + np.arange(int(0.4 * n))) % n]
    return arc[::4] if len(arc) > 8 else arc


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The tight box of the mask, as the validation's key-slice prompts draw it."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(max(xs.max(), xs.min() + 1)), float(max(ys.max(), ys.min() + 1))


def held_out_cases(args, rng: np.random.Generator) -> list[dict]:
    """Per held-out volume and object: a key slice through the object (in the middle 60% of its extent) and
    the prompts an annotator would draw there."""
    cases = []
    for s in range(args.held_out):
        study = generated_study(2000 + s, args.slices, args.size)
        for value in (int(v) for v in np.unique(study.label) if v):
            obj = study.label == value
            areas = obj.reshape(obj.shape[0], -1).sum(1)
            present = np.nonzero(areas >= max(args.min_area, 0.3 * areas.max()))[0]
            if len(present) == 0:
                continue
            lo, hi = present.min(), present.max()
            span = hi - lo
            k = int(rng.integers(lo + int(0.2 * span), hi - int(0.2 * span) + 1))
            mask = obj[k]
            if mask.sum() < args.min_area:
                continue
            with_background = len(cases) % 2 == 1
            strokes = Strokes(
                foreground_scribbles=(foreground_scribble(mask),),
                background_scribbles=(background_scribble(mask, rng),) if with_background else (),
            )
            cases.append(
                {
                    "study": study,
                    "volume": s,
                    "value": value,
                    "slice": k,
                    "mask": mask,
                    "box": box_of(mask),
                    "elsewhere": box_of(obj[present[len(present) // 2]]),  # the control box of the volume's other cases
                    "strokes": strokes,
                    "with_background": with_background,
                }
            )
    for case in cases:  # the control's box: another object of the same volume (the case's own if it is alone)
        others = [c for c in cases if c["volume"] == case["volume"] and c is not case]
        case["box_elsewhere"] = others[0]["elsewhere"] if others else case["elsewhere"]
    return cases


def trained_model(args, device, dtype) -> tuple[torch.nn.Module, dict]:
    """The MedSAM2 architecture from random weights, fine-tuned for ``--train-minutes`` (best validated weights)."""
    overrides = image_size_overrides(args.image_size) if args.image_size != 512 else []
    torch.manual_seed(0)
    model = build_model(MEDSAM2_CONFIG, device, overrides)
    train_set = [generated_study(s, args.slices, args.size) for s in range(args.train_studies)]
    val_set = [generated_study(1000 + s, args.slices, args.size) for s in range(args.val_studies)]
    settings = TrainSettings(
        epochs=10_000,  # bounded by time below
        steps_per_epoch=args.steps_per_epoch,
        clip_length=args.clip_length,
        max_objects=args.max_objects,
        lr=args.lr,
        grad_clip=args.grad_clip,
        p_box=0.5,  # the trainer's default: else 1-3 clicks
        p_correction=args.p_correction,
    )
    best: dict = {}

    def keep_best(m, report) -> None:
        best.update({k: v.detach().clone() for k, v in m.state_dict().items()})

    t0 = time.perf_counter()
    deadline = t0 + 60 * args.train_minutes

    def progress(report, result) -> None:
        print(
            f"epoch {report.epoch}: loss {report.train_loss:.3f}, val Dice {report.val_dice:.3f}, "
            f"{report.slices_per_second} slices/s, {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    stop = lambda: time.perf_counter() > deadline  # noqa: E731
    result = train(model, train_set, val_set, settings, device, dtype, keep_best, progress, should_stop=stop)
    if best:
        model.load_state_dict(best)
    minutes = round((time.perf_counter() - t0) / 60, 2)
    info = {
        "model": f"hiera-t {args.image_size} (MedSAM2 architecture), random init, fine-tuned {minutes} min here",
        "training": {
            "volumes": f"{args.train_studies} x {args.slices}x{args.size}x{args.size} (finetune_speed.generated_study)",
            "train_parts": settings.train_parts,
            "prompts": f"box p={settings.p_box}, else 1-3 clicks; correction click with previous mask "
            f"p={settings.p_correction}",
            "epochs": len(result.epochs),
            "val_dice_initial": round(result.initial["dice"], 4),
            "val_dice_best": round(result.best_dice, 4),
            "best_epoch": result.best_epoch,
        },
    }
    return model.eval(), info


def evaluate(model, cases: list[dict], device, dtype) -> tuple[dict[str, list[float]], dict]:
    """Dice of every prompt kind on every case; the engine's resolved prompts summarised."""
    dices: dict[str, list[float]] = {kind: [] for kind in KINDS}
    clicks, prior_pixels, agreement = [], [], []
    sessions: dict[int, VolumeSession] = {}
    for case in cases:
        study = case["study"]
        if case["volume"] not in sessions:
            sessions = {case["volume"]: VolumeSession(study.frames, model, device, dtype, dtype or torch.float32)}
        session = sessions[case["volume"]]
        session.encode([case["slice"]])
        _, rows, cols = study.frames.shape
        preds = {}
        for kind, (use_box, use_strokes, mode) in KINDS.items():
            prompt = KeySlicePrompt(
                str(case["value"]),
                case["value"],
                case["slice"],
                box=(case["box_elsewhere"] if kind == "box_elsewhere" else case["box"]) if use_box else None,
                strokes=case["strokes"] if use_strokes else Strokes(),
            )
            resolved = resolve_drawn(prompt, None, mode, rows, cols)
            if kind == "scribbles_points":
                clicks.append(len(resolved.points))
            if kind == "scribbles_mask":
                prior_pixels.append(int(resolved.mask.sum()))
            logits = segment_key_slice(session, resolved)["pred_masks"]
            preds[kind] = (upsample_logits(logits, rows, cols)[0] > 0).cpu().numpy()
            dices[kind].append(dice_score(preds[kind], case["mask"]))
        agreement.append(dice_score(preds["box"], preds["box_elsewhere"]))
    summary = {
        "clicks_per_case_points_mode": round(float(np.mean(clicks)), 2),
        "prior_mask_pixels_mask_mode": round(float(np.mean(prior_pixels)), 1),
        "object_pixels": round(float(np.mean([c["mask"].sum() for c in cases])), 1),
        "dice_between_box_and_box_elsewhere_masks": round(float(np.mean(agreement)), 4),
    }
    return dices, summary


def paired(a: list[float], b: list[float], rng: np.random.Generator, names=("points", "mask")) -> dict:
    """Mean of a - b per case, its bootstrap 95% interval, and the cases each side wins (by > 0.005)."""
    diff = np.array(a) - np.array(b)
    boots = [diff[rng.integers(len(diff), size=len(diff))].mean() for _ in range(2000)]
    return {
        "mean_difference": round(float(diff.mean()), 4),
        "ci95": [round(float(np.percentile(boots, 2.5)), 4), round(float(np.percentile(boots, 97.5)), 4)],
        f"{names[0]}_better": int((diff > 0.005).sum()),
        f"{names[1]}_better": int((diff < -0.005).sum()),
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="a SAM2/MedSAM2 checkpoint file (then nothing is trained)")
    ap.add_argument("--model-config", default="", help="its model config YAML (default: MedSAM2's)")
    ap.add_argument("--train-minutes", type=float, default=4.0, help="training from random weights (no checkpoint)")
    ap.add_argument("--image-size", type=int, default=128, help="model input when training from random weights")
    ap.add_argument("--size", type=int, default=128, help="in-plane size of the generated volumes")
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--train-studies", type=int, default=16)
    ap.add_argument("--val-studies", type=int, default=1, help="validated after each epoch (best weights kept)")
    ap.add_argument("--held-out", type=int, default=20, help="held-out volumes (up to 3 objects each)")
    ap.add_argument("--min-area", type=int, default=40, help="smallest object cross-section, in pixels")
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--clip-length", type=int, default=1, help="1: every step trains the prompted slice")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grad-clip", type=float, default=0.1)
    ap.add_argument("--max-objects", type=int, default=3)
    ap.add_argument("--p-correction", type=float, default=0.5)
    ap.add_argument("--min-prompt-effect", type=float, default=0.05, help="Dice, box minus box elsewhere")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scribble_prompts.json"))
    return ap.parse_args()


def kind_lines(dices: dict[str, list[float]], cases: list[dict], first: dict) -> list[dict]:
    """One line per prompt kind: mean and median Dice, ratio to the box, with and without a background scribble."""
    lines = []
    box_dice = float(np.mean(dices["box"]))
    with_bg = np.array([c["with_background"] for c in cases])
    for kind, values in dices.items():
        v = np.array(values)
        line = {
            "kind": kind,
            "scribble_mode": KINDS[kind][2] if KINDS[kind][1] else None,
            "mean_dice": round(float(v.mean()), 4),
            "median_dice": round(float(np.median(v)), 4),
            "n": len(v),
            "ratio_to_box": round(float(v.mean()) / max(box_dice, 1e-9), 3),
            "mean_dice_with_background_scribble": round(float(v[with_bg].mean()), 4),
            "mean_dice_foreground_only": round(float(v[~with_bg].mean()), 4),
        }
        lines.append({**line, **first} if kind == "box" else line)
    return lines


def verdict(dices: dict[str, list[float]], rng: np.random.Generator, min_prompt_effect: float) -> dict:
    """points against mask, named a winner only if the control shows that the model reads its prompts and the
    paired difference on scribbles alone is significant."""
    alone = paired(dices["scribbles_points"], dices["scribbles_mask"], rng)
    with_box = paired(dices["box_scribbles_points"], dices["box_scribbles_mask"], rng)
    control = paired(dices["box"], dices["box_elsewhere"], rng, ("box", "box_elsewhere"))
    leader = "points" if alone["mean_difference"] > 0 else "mask" if alone["mean_difference"] < 0 else "tie"
    significant = alone["ci95"][0] > 0 or alone["ci95"][1] < 0
    # the comparison means something only if the model segments what its prompts point at
    reads_prompts = control["ci95"][0] > min_prompt_effect
    conclusive = reads_prompts and significant
    if conclusive:
        reason = f"{leader} ahead on scribbles alone, 95% interval of the paired difference excludes 0"
    elif not reads_prompts:
        reason = (
            f"the model does not read its prompts: a box on another object scores "
            f"{control['mean_difference']:+.4f} Dice against the right box (needs > {min_prompt_effect} at the "
            "95% lower bound); a scribble-encoding comparison on it says nothing about SAM2"
        )
    else:
        reason = "the paired difference's 95% interval includes 0"
    return {
        "winner": leader if conclusive else "none (inconclusive)",
        "measured_leader": leader,
        "conclusive": conclusive,
        "reason": reason,
        "decided_by": "scribbles alone, mean paired Dice difference (points - mask)",
        "scribbles_alone_points_minus_mask": alone,
        "with_box_points_minus_mask": with_box,
        "with_box_agrees": bool(np.sign(with_box["mean_difference"]) == np.sign(alone["mean_difference"])),
        "control_box_minus_box_elsewhere": control,
        "model_reads_prompts": reads_prompts,
    }


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = compute_dtype_for(device)
    if args.checkpoint:
        resolved = resolve_checkpoint(args.checkpoint, config=args.model_config or None)
        model = load_model(resolved, device)
        info = {"model": f"checkpoint {resolved.path} ({resolved.config.name}), not fine-tuned"}
    else:
        model, info = trained_model(args, device, dtype)
    rng = np.random.default_rng(7)
    cases = held_out_cases(args, rng)
    t0 = time.perf_counter()
    dices, resolved_summary = evaluate(model, cases, device, dtype)
    first = {
        **info,
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "held_out": f"{len(cases)} objects in {args.held_out} volumes {args.slices}x{args.size}x{args.size} "
        "(seeds 2000+), one key slice each; a background scribble in every other case",
    }
    lines = JsonLines(None)
    for line in kind_lines(dices, cases, first):
        lines.emit(line)
    last = verdict(dices, rng, args.min_prompt_effect)
    last.update(resolved_summary, evaluation_seconds=round(time.perf_counter() - t0, 1))
    lines.emit({**last, "total_seconds": round(time.perf_counter() - started, 1)})
    lines.write_array(args.out)


if __name__ == "__main__":
    main()
