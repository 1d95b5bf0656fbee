"""Interaction latency on the real server, driven like a viewer: open the image (Slicer's download), wait while the
annotator looks and draws (the think time), click; each interaction timed from the click to the answer.

Two servers run one after the other in the same process, on copies of the demo lung CT (512 x 512 x 61, the
MedSAM2 model shape with random weights, saved and loaded as a checkpoint):
- ``today``: the path before this work (``--conf encode_ahead off warm_up off cpu_tracking stock cpu_encoder
  torch``);
- ``new``: the defaults (encode-ahead, warm-up at start, the CPU tracking modules, the OpenVINO encoder).
Prints one JSON line per interaction and per variant, then one ``summary`` line per interaction with the ratio
today / new, the target, and the Dice between the two variants' labels (same prompts).

    python bench/interactive_latency.py --out bench/results/interactive_cpu.jsonl
    python bench/interactive_latency.py --think 20 --variants new     # the new path only
"""

from __future__ import annotations

import argparse
import json
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

VARIANTS = {  # every setting named: the test helper that starts the server has defaults of its own
    "today": {"encode_ahead": "off", "warm_up": "off", "cpu_tracking": "stock", "cpu_encoder": "torch"},
    "new": {"encode_ahead": "on", "warm_up": "on", "cpu_tracking": "fast", "cpu_encoder": "openvino"},
}
# the lung2 tumour (pixel x = i, y = j) on its key slice, and a second structure for the two-label request
KEY_SLICE, CORRECTION_SLICE = 20, 30
TUMOUR_BOX = [317, 335, 385, 395]
SECOND_BOX = [60, 120, 250, 400]
TARGETS_S = {"2d_first_on_image": 0.5, "3d_one_label": 10.0, "3d_correction": 5.0, "3d_two_labels": 15.0}


def interactions() -> list[dict[str, Any]]:
    """(name, image copy, think seconds key, model, params) of the session a viewer runs, in order."""
    box_2d = {"params": {"prompts": [{"label": "lesion", "slice": KEY_SLICE, "box": TUMOUR_BOX}]}}
    one = {"prompts": [{"label": "lesion", "slice": KEY_SLICE, "box": TUMOUR_BOX}], "client_id": "reader-1"}
    correction = {"label": "lesion", "foreground": [[350, 365, CORRECTION_SLICE]], "correction": True}
    two = {
        "prompts": [
            {"label": "lesion", "slice": KEY_SLICE, "box": TUMOUR_BOX},
            {"label": "organ", "slice": KEY_SLICE, "box": SECOND_BOX},
        ],
        "client_id": "reader-2",
    }
    return [
        {"name": "2d_first_after_start", "image": "lung_a", "think": "think_2d", "model": "medsam2_2d", **box_2d},
        {"name": "2d_first_on_image", "image": "lung_b", "think": "think_2d", "model": "medsam2_2d", **box_2d},
        {"name": "3d_one_label", "image": "lung_c", "think": "think", "model": "medsam2_3d", "params": one},
        {
            "name": "3d_correction",
            "image": "lung_c",
            "think": None,
            "model": "medsam2_3d",
            "params": {**correction, "client_id": "reader-1"},
        },
        {"name": "3d_two_labels", "image": "lung_d", "think": "think", "model": "medsam2_3d", "params": two},
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
            if step["think"] is not None:  # the viewer opens the image, the annotator looks and draws
                assert server.get("/datastore/image", params={"image": step["image"]}).status_code == 200
                time.sleep(getattr(args, step["think"]))
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


def summaries(results: dict[str, list[dict]]) -> list[dict]:
    """Per interaction: seconds per variant, ratio today / new, target and whether the new path meets it."""
    if not {"today", "new"} <= set(results):
        return []
    out = []
    today = {line["interaction"]: line for line in results["today"]}
    for line in results["new"]:
        base = today[line["interaction"]]
        target = TARGETS_S.get(line["interaction"])
        summary = {
            "summary": line["interaction"],
            "today_s": base["seconds"],
            "new_s": line["seconds"],
            "ratio": round(base["seconds"] / max(line["seconds"], 1e-9), 2),
            "dice_new_vs_today": round(dice(line["label"], base["label"]), 4),
        }
        if target is not None:
            summary.update(target_s=target, target_met=line["seconds"] <= target)
        out.append(summary)
    for name, lines in results.items():  # the first request of a server against the same request on the next image
        seconds = {line["interaction"]: line["seconds"] for line in lines}
        ratio = seconds["2d_first_after_start"] / max(seconds["2d_first_on_image"], 1e-9)
        out.append({"summary": "first_request_after_start_over_next", "variant": name, "ratio": round(ratio, 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=REPO / "demo" / "studies" / "lung2.nii.gz")
    parser.add_argument("--think", type=float, default=20.0, help="seconds between opening and a 3D click")
    parser.add_argument("--think-2d", dest="think_2d", type=float, default=3.0, help="the same before a 2D box")
    parser.add_argument("--variants", default="today,new")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    common = {"device": "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"}
    common.update(torch=torch.__version__, host=platform.node()[:20], image=args.image.name)

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
