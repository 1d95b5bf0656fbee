"""Undo and redo latency against the requests they replace, on the demo lung CT (``lung2``, 61 x 512 x 512).

The app's wiring (``lib/configs/medsam2.py`` with its default settings) serves a random-weights MedSAM2-shaped
model (hiera-t 512) saved as a checkpoint the way the tests do (``tests/conftest.py``'s ``random_checkpoint``).
One annotation session sends: a 3D box on the manual label's largest slice, a correction (a foreground click
on another slice of the label), then ``{"undo": true}`` and ``{"redo": true}``, then ``--cycles`` more
undo/redo pairs. One JSON line per request with the segmenter's own ``latencies.total`` (and its stages), and a
summary with the ratios undo / propagation and undo / correction of the same run.

    python bench/undo_latency.py                                # CPU: the whole volume
    python bench/undo_latency.py --slice-range 20,40            # bound the 3D requests
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from common import REPO, JsonLines, device_name, dtype_name, timed, use_repo_paths
from scipy import ndimage

use_repo_paths()


from lib.configs.medsam2 import MedSAM2  # noqa: E402
from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, save_checkpoint  # noqa: E402
from sam2_testing import object_present_bias  # noqa: E402

DEMO = REPO / "demo" / "studies"


def demo_case(name: str) -> tuple[Path, Path]:
    """The demo study's image and manual label, prepared by scripts/prepare_demo.py if not there yet."""
    image, label = DEMO / f"{name}.nii.gz", DEMO / "labels" / "final" / f"{name}.nii.gz"
    if not (image.exists() and label.exists()):
        script = REPO / "scripts" / "prepare_demo.py"
        subprocess.run([sys.executable, str(script), "--output", str(DEMO)], check=True)
    return image, label


def prompts_from_label(label: np.ndarray, shift: int) -> tuple[dict, dict]:
    """A box on the label's largest axial slice; a foreground click at the label's deepest pixel ``shift``
    slices away (or the nearest labelled slice)."""
    areas = label.reshape(label.shape[0], -1).sum(1)
    key = int(areas.argmax())
    ys, xs = np.nonzero(label[key])
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    labelled = np.nonzero(areas)[0]
    other = int(labelled[np.argmin(np.abs(labelled - (key + shift)))])
    y, x = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(label[other]))), label[other].shape)
    return {"label": "lesion", "slice": key, "box": box}, {
        "label": "lesion",
        "slice": other,
        "foreground": [[float(x), float(y)]],
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="lung2", help="a demo study (scripts/prepare_demo.py)")
    ap.add_argument("--slice-range", default="", help="first,last axial slices of the 3D requests (default: all)")
    ap.add_argument("--click-shift", type=int, default=4, help="slices between the box and the correction click")
    ap.add_argument("--cycles", type=int, default=5, help="undo/redo pairs after the first, for a median")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "undo_latency.json"))
    return ap.parse_args()


def app_segmenter(tmp: str, device: str) -> tuple[MedSAM2, float]:
    """The app's own wiring and default settings on a random-weights checkpoint saved as the tests save it, its
    model loaded (the server loads it on the first request; not part of the figures): (config, load seconds)."""
    torch.manual_seed(0)
    checkpoint = Path(tmp) / "random_medsam2.pt"
    save_checkpoint(object_present_bias(build_model(MEDSAM2_CONFIG)), checkpoint)
    config = MedSAM2()
    config.init("medsam2", tmp, {"checkpoint": str(checkpoint), "device": device}, None)
    t0 = time.perf_counter()
    config.segmenter.provider.get()
    return config, round(time.perf_counter() - t0, 2)


def request_sequence(box_prompt: dict, click_prompt: dict, bounds: list[int] | None, cycles: int) -> list:
    """(name, params): a 3D box, a correction, undo, redo, then ``cycles`` more undo/redo pairs."""
    extra = {"slice_range": bounds} if bounds else {}
    sequence = [
        ("3d_box", {"prompts": [box_prompt], **extra}),
        ("correction", {"prompts": [click_prompt], "correction": True, **extra}),
        ("undo", {"undo": True}),
        ("redo", {"redo": True}),
    ]
    return sequence + [("undo_again", {"undo": True}), ("redo_again", {"redo": True})] * cycles


def request_line(name: str, out: dict, answer: np.ndarray, wall: float) -> dict:
    """One request's line: its latencies, the call's wall time, the labelled voxels and the undo history."""
    return {
        "request": name,
        "latency_total_s": out["latencies"]["total"],
        "wall_s": wall,  # the call as its caller sees it: for undo/redo, with the label's decompression
        "latencies": out["latencies"],
        "labelled_voxels": int((answer > 0).sum()),
        "history": out["history"],
    }


def summary_line(bounds: list[int] | None, totals: dict, walls: dict, labels: dict) -> dict:
    """Undo and redo against the propagation and the correction they replace; whether they restore the answers."""
    undo, redo = totals["undo"][0], totals["redo"][0]
    repeats_undo, repeats_redo = totals.get("undo_again", []), totals.get("redo_again", [])
    wall_undo = float(np.median(walls["undo"] + walls.get("undo_again", [])))
    wall_redo = float(np.median(walls["redo"] + walls.get("redo_again", [])))
    return {
        "summary": True,
        "slice_range": bounds or "whole volume",
        "propagation_s": totals["3d_box"][0],
        "correction_s": totals["correction"][0],
        "undo_s": undo,
        "redo_s": redo,
        "undo_median_of_repeats_s": float(np.median(repeats_undo)) if repeats_undo else None,
        "redo_median_of_repeats_s": float(np.median(repeats_redo)) if repeats_redo else None,
        "undo_vs_propagation": round(undo / totals["3d_box"][0], 5),
        "undo_vs_correction": round(undo / totals["correction"][0], 5),
        "redo_vs_propagation": round(redo / totals["3d_box"][0], 5),
        "undo_wall_median_s": wall_undo,
        "redo_wall_median_s": wall_redo,
        "undo_wall_vs_propagation_wall": round(wall_undo / walls["3d_box"][0], 5),
        "undo_wall_vs_correction_wall": round(wall_undo / walls["correction"][0], 5),
        "note": "wall_s: the segmenter call's wall time; latencies.total of an undo/redo includes decompressing its "
        "label since commit 'An undo's latency includes decompressing the label it answers' (results before it: not)",
        "undo_restores_first_answer": bool((labels["undo"] == labels["3d_box"]).all()),
        "redo_restores_correction": bool((labels["redo"] == labels["correction"]).all()),
    }


def main() -> None:
    args = parse_args()
    image_path, label_path = demo_case(args.case)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))) > 0  # (k, j, i)
    box_prompt, click_prompt = prompts_from_label(label, args.click_shift)
    bounds = [int(v) for v in args.slice_range.split(",")] if args.slice_range else None
    lines = JsonLines(None)
    labels, totals, walls = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        config, load_s = app_segmenter(tmp, args.device)
        s = config.settings
        first = {
            "model": "hiera-t 512 (MedSAM2 shape), random weights, saved and loaded as a checkpoint",
            "device": device_name(args.device),
            "dtype": dtype_name(config.segmenter.provider.compute_dtype),
            "host": platform.node(),
            "image": f"{args.case} {list(label.shape)[::-1]} (i, j, k)",
            "settings": f"app defaults: window {s.window.name or s.window.mode}, encode_batch {s.encode_batch}, "
            f"undo_levels {s.undo_levels}, precision {s.precision}",
            "slice_range": bounds or "whole volume",
            "model_load_s_before_it": load_s,
            "prompt": box_prompt,
        }
        for name, request in request_sequence(box_prompt, click_prompt, bounds, args.cycles):
            with timed() as t:
                answer, out, _ = config.segmenter.segment_3d(str(image_path), {**request, "client_id": "bench"})
            labels.setdefault(name, answer)
            totals.setdefault(name, []).append(out["latencies"]["total"])
            walls.setdefault(name, []).append(round(t.seconds, 4))
            if name.endswith("_again"):
                continue
            line = request_line(name, out, answer, round(t.seconds, 4))
            if name == "3d_box":
                line.update(first, window_used=out["window"])
            if name == "correction":
                line["prompt"] = click_prompt
            lines.emit(line)
    lines.emit(summary_line(bounds, totals, walls, labels))
    lines.write_array(args.out)


if __name__ == "__main__":
    main()
