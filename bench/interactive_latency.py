"""Interaction latency on the real server, driven like a viewer: open the image (Slicer's download), wait while the
annotator looks and draws (the think time, long enough for encode-ahead to finish), click; each interaction timed
from the click to the answer.

Servers run one after the other in the same process, on copies of the demo lung CT (512 x 512 x 61, the MedSAM2
model shape with random weights, saved and loaded as a checkpoint), all with encode-ahead, warm-up, the CPU
tracking modules and the OpenVINO encoder:
- ``today``: full-frame tracking, every correction re-propagates the whole label, every key slice attended;
- ``new``: the defaults: region-of-interest tracking, local corrections, at most 4 key slices attended, the two
  directions on two single-thread workers (``tracking_workers 2``);
- ``roi_recompute``: region-of-interest tracking with every correction recomputed in full (the reference the local
  corrections are compared with, slice by slice over the whole volume);
- ``new_1worker`` (not by default): ``new`` with one tracking worker (``--conf tracking_workers 1``).

Each 3D click waits for the think time and then, on a loaded machine, until encode-ahead has finished (/info);
the two-label request is another reader's session on the image of the one-label session (encoded once).

Masks of realistic size: random weights fill ~85 % of every slice, which would make every region of interest grow
to the whole frame. So every 3D prompt is a lasso (SAM2's mask prompt) on a fixed region drawn from the box (the
lung2 tumour's box, and a second box for the two-label request), and the ROI variants run with
``--conf tracking_overflow clip``: the region of interest stays the key-slice region plus the margin, the size a
trained model's masks of that tumour keep. Full-frame tracking costs the same whatever the masks.

Prints one JSON line per interaction and per variant, then one ``summary`` line per interaction with the ratio
today / new and the target, the fifth correction against the first, and the per-slice Dice between local
corrections and full recomputes.

    python bench/interactive_latency.py --out bench/results/interactive_cpu.jsonl
    python bench/interactive_latency.py --think 20 --variants today,new
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))
sys.path.insert(0, str(REPO / "tests"))

from conftest import start_server, stop_server  # noqa: E402
from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, save_checkpoint  # noqa: E402
from sam2_testing import object_present_bias  # noqa: E402

BASE = {"encode_ahead": "on", "warm_up": "on", "cpu_tracking": "fast", "cpu_encoder": "openvino"}
ROI = {"tracking_region": "roi", "tracking_overflow": "clip", "max_key_slices": "4"}
VARIANTS = {  # every setting named: the test helper that starts the server has defaults of its own
    "today": {**BASE, "tracking_region": "full", "local_corrections": "off", "max_key_slices": "0"},
    "new": {**BASE, **ROI, "local_corrections": "on", "tracking_workers": "2"},
    "roi_recompute": {**BASE, **ROI, "local_corrections": "off", "tracking_workers": "2"},
    "new_1worker": {**BASE, **ROI, "local_corrections": "on", "tracking_workers": "1"},
}
# the lung2 tumour (pixel x = i, y = j) on its key slice, and a second structure for the two-label request
KEY_SLICE = 20
TUMOUR_BOX = [317, 335, 385, 395]
SECOND_BOX = [60, 120, 250, 400]
# five corrections in a row: a lasso inside the tumour's box on each of these slices
CORRECTION_SLICES = (22, 18, 24, 16, 21)
CORRECTION_BOX = [335, 350, 370, 385]
# the targets hold after encode-ahead has finished: a 2D box on a slice not encoded yet also waits for its
# encoding (2d_first_*, reported without a target)
TARGETS_S = {"2d_on_encoded_image": 0.3, "3d_one_label": 3.0, "3d_correction": 1.5, "3d_two_labels": 5.0}


def lasso(box: list[int]) -> list[list[list[int]]]:
    """A box as a closed outline: the fixed region the 3D prompts use (see the module docstring)."""
    x0, y0, x1, y1 = box
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]]


def interactions() -> list[dict[str, Any]]:
    """(name, image copy, think seconds key, model, params) of the session a viewer runs, in order."""
    box_2d = {"params": {"prompts": [{"label": "lesion", "slice": KEY_SLICE, "box": TUMOUR_BOX}]}}
    tumour = {"label": "lesion", "slice": KEY_SLICE, "foreground_lasso": lasso(TUMOUR_BOX)}
    one = {"prompts": [tumour], "client_id": "reader-1"}
    two = {
        "prompts": [tumour, {"label": "organ", "slice": KEY_SLICE, "foreground_lasso": lasso(SECOND_BOX)}],
        "client_id": "reader-2",
    }
    corrections = [
        {
            "name": f"3d_correction_{n}",
            "image": "lung_c",
            "think": None,
            "model": "medsam2_3d",
            "params": {
                "prompts": [{"label": "lesion", "slice": k, "foreground_lasso": lasso(CORRECTION_BOX)}],
                "correction": True,
                "client_id": "reader-1",
            },
        }
        for n, k in enumerate(CORRECTION_SLICES, start=1)
    ]
    return [
        {"name": "2d_first_after_start", "image": "lung_a", "think": "think_2d", "model": "medsam2_2d", **box_2d},
        {"name": "2d_first_on_image", "image": "lung_b", "think": "think_2d", "model": "medsam2_2d", **box_2d},
        {"name": "3d_one_label", "image": "lung_c", "think": "think", "model": "medsam2_3d", "params": one},
        *corrections,
        {"name": "3d_two_labels", "image": "lung_c", "think": None, "model": "medsam2_3d", "params": two},
        {"name": "2d_on_encoded_image", "image": "lung_c", "think": None, "model": "medsam2_2d", **box_2d},
    ]


def make_inputs(folder: Path, image: Path) -> tuple[Path, Path]:
    """A studies folder with one copy of the image per interaction, and a random MedSAM2-shaped checkpoint."""
    studies = folder / "studies"
    studies.mkdir()
    for name in {i["image"] for i in interactions()}:
        shutil.copy(image, studies / f"{name}.nii.gz")
    torch.manual_seed(0)
    checkpoint = folder / "random_medsam2.pt"
    save_checkpoint(object_present_bias(build_model(MEDSAM2_CONFIG)), checkpoint)
    return studies, checkpoint


def wait_until_warm(server, warm_up: bool, timeout: float = 600.0) -> float:
    """Seconds until /health/ready and, where warm-up is on, its end (a server starts long before users click)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        ready = server.get("/health/ready").status_code == 200
        if ready and (not warm_up or server.get("/info/").json()["warm_up"].get("medsam2")):
            return time.perf_counter() - t0
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def encode_ahead_busy(info: Any) -> bool:
    """Whether /info's ``encode_ahead`` status shows a job running or queued."""
    if isinstance(info, dict):
        if info.get("running") or info.get("queued"):
            return True
        return any(encode_ahead_busy(v) for v in info.values())
    if isinstance(info, list):
        return any(encode_ahead_busy(v) for v in info)
    return False


def wait_for_encode_ahead(server, minimum: float, timeout: float = 900.0) -> None:
    """The think time, and on a loaded machine longer: until encode-ahead has finished (the issue's condition)."""
    time.sleep(minimum)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout and encode_ahead_busy(server.get("/info/").json().get("encode_ahead")):
        time.sleep(1.0)


def split_answer(response: requests.Response) -> tuple[np.ndarray, dict[str, Any]]:
    """(label array, result JSON) from MONAI Label's output=all multipart answer."""
    boundary = response.headers["content-type"].split("boundary=")[1].encode()
    label, result = None, {}
    for part in response.content.split(b"--" + boundary):
        head, _, body = part.partition(b"\r\n\r\n")
        body = body.rstrip(b"\r\n")
        if b"application/json" in head:
            result = json.loads(body)
        elif b"filename=" in head:
            suffix = ".nii.gz" if b".nii.gz" in head else ".nrrd"
            with tempfile.NamedTemporaryFile(suffix=suffix) as f:
                f.write(body)
                f.flush()
                label = sitk.GetArrayFromImage(sitk.ReadImage(f.name))
    return label, result


def run_variant(name: str, conf: dict[str, str], studies: Path, checkpoint: Path, args, folder: Path) -> list[dict]:
    """One server, the viewer's session; a line per interaction (with the label, dropped before printing)."""
    server = start_server(
        studies, {"checkpoint": str(checkpoint), "window": "lung", **conf}, folder / f"{name}.log", timeout=600
    )
    lines = []
    try:
        started = wait_until_warm(server, conf.get("warm_up") != "off")
        for step in interactions():
            if name == "roi_recompute" and not step["name"].startswith(("3d_one_label", "3d_correction")):
                continue  # the reference for the local corrections only
            if step["think"] is not None:  # the viewer opens the image, the annotator looks and draws
                assert server.get("/datastore/image", params={"image": step["image"]}).status_code == 200
                if step["think"] == "think":
                    wait_for_encode_ahead(server, args.think)
                else:
                    time.sleep(args.think_2d)
            t0 = time.perf_counter()
            r = server.post(
                f"/infer/{step['model']}?image={step['image']}&output=all",
                data={"params": json.dumps(step["params"])},
                timeout=900,
            )
            seconds = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"{step['name']}: HTTP {r.status_code} {r.text[:500]}")
            label, result = split_answer(r)
            lines.append(
                {
                    "interaction": step["name"],
                    "variant": name,
                    "seconds": round(seconds, 3),
                    "server_latencies": result.get("latencies"),
                    "ready_at_request": result.get("session", {}).get("ready_at_request"),
                    "encoded_ahead": result.get("session", {}).get("encoded_ahead"),
                    "tracking": result.get("tracking"),
                    "steps": _steps(result),
                    "load_average": [round(v, 2) for v in os.getloadavg()],
                    "think_s": getattr(args, step["think"]) if step["think"] else 0,
                    "server_start_to_warm_s": round(started, 1),
                    "label": label,
                }
            )
    finally:
        stop_server(server)
    return lines


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _steps(result: dict) -> int | None:
    local = (result.get("tracking") or {}).get("local_correction")
    return local["steps"] if local else None


def per_slice_dice(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Dice between two (k, j, i) labels on every slice k."""
    return [round(dice(a[k], b[k]), 4) for k in range(a.shape[0])]


def target_of(name: str) -> float | None:
    return TARGETS_S.get(name.rsplit("_", 1)[0] if name.startswith("3d_correction") else name)


def summaries(results: dict[str, list[dict]]) -> list[dict]:
    """Per interaction: seconds per variant, ratio today / new, target and whether the new path meets it; the fifth
    correction against the first; local corrections against full recomputes, slice by slice."""
    out = []
    if {"today", "new"} <= set(results):
        today = {line["interaction"]: line for line in results["today"]}
        for line in results["new"]:
            base = today[line["interaction"]]
            target = target_of(line["interaction"])
            summary = {
                "summary": line["interaction"],
                "today_s": base["seconds"],
                "new_s": line["seconds"],
                "ratio": round(base["seconds"] / max(line["seconds"], 1e-9), 2),
            }
            for other in ("new_1worker", "roi_recompute"):
                match = [x for x in results.get(other, []) if x["interaction"] == line["interaction"]]
                if match:
                    summary[f"{other}_s"] = match[0]["seconds"]
            if target is not None:
                summary.update(target_s=target, target_met=line["seconds"] <= target)
            out.append(summary)
    for name, lines in results.items():
        seconds = {line["interaction"]: line["seconds"] for line in lines}
        last = f"3d_correction_{len(CORRECTION_SLICES)}"
        out.append(
            {
                "summary": "fifth_correction_over_first",
                "variant": name,
                "ratio": round(seconds[last] / max(seconds["3d_correction_1"], 1e-9), 2),
            }
        )
    if {"new", "roi_recompute"} <= set(results):
        full = {line["interaction"]: line for line in results["roi_recompute"]}
        for line in results["new"]:
            if line["interaction"].startswith("3d_correction"):
                per = per_slice_dice(line["label"], full[line["interaction"]]["label"])
                out.append(
                    {
                        "summary": "local_vs_full_recompute_dice",
                        "interaction": line["interaction"],
                        "slice": CORRECTION_SLICES[int(line["interaction"][-1]) - 1],
                        "volume_dice": round(dice(line["label"], full[line["interaction"]]["label"]), 4),
                        "min_slice_dice": min(per),
                        "per_slice_dice": per,
                        "local_steps": line["steps"],
                    }
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--image", type=Path, default=REPO / "demo" / "studies" / "lung2.nii.gz", help="made by scripts/start_demo.sh"
    )
    parser.add_argument("--think", type=float, default=20.0, help="seconds between opening and a 3D click")
    parser.add_argument("--think-2d", dest="think_2d", type=float, default=3.0, help="the same before a 2D box")
    parser.add_argument("--variants", default="today,new,roi_recompute")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    common = {"device": "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"}
    common.update(torch=torch.__version__, host=platform.node()[:20], image=args.image.name)
    common["note"] = "load_average (1, 5, 15 min) on each line: what else ran on the cores"

    def emit(line: dict[str, Any]) -> None:
        text = json.dumps({"bench": "interactive_latency", **common, **line})
        print(text, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(text + "\n")

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        studies, checkpoint = make_inputs(folder, args.image)
        for name in args.variants.split(","):
            results[name] = run_variant(name, VARIANTS[name], studies, checkpoint, args, folder)
            for line in results[name]:
                emit({k: v for k, v in line.items() if k != "label"})
    for line in summaries(results):
        emit(line)


if __name__ == "__main__":
    main()
