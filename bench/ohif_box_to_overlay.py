"""From a box drawn in OHIF to the overlay on screen: the MedSAM2 panel in headless Chromium, on the demo lung CT
(pyradiomics lung2, 512 x 512 x 61) in a real Orthanc, with the app's default settings (encode-ahead, OpenVINO
encoder, CPU tracking modules). ``--model reference`` (default): the reference model (tests/fixtures/reference_sam2.pt,
docs/reference_model.md), whose masks have a realistic size; ``--model medsam2-random``: the MedSAM2 model shape
with random weights (``object_present_bias``: masks fill most of the volume, the worst case for the wire).

The panel asks for changed regions (``changed_since``, a gzip NRRD of the changed box): ``wire_bytes`` is the
answer's body as the browser received it. The baseline, whole-label answer (what the panel asked for before,
an uncompressed NRRD of the whole volume) is measured in the same run by the direct request below
(``whole_label_bytes``).

The panel runs in live mode: the box's mouse release sends the request. The panel's own clock gives the time from
the release to the frame that shows the answer (``prompt_to_overlay_s``). The baseline, in the same run, is the
same request sent straight to the server by HTTP (what a script or the panel's request alone costs): the ratio is
the browser path's overhead (multipart parsing, NRRD decoding, writing the labelmap, the render).

Before the 3D box the annotator "looks" at the study for ``--think`` seconds (encode-ahead runs meanwhile, as in
``bench/interactive_latency.py``); the 2D boxes follow on other slices.

    python bench/ohif_box_to_overlay.py --out bench/results/ohif_box_to_overlay_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))
sys.path.insert(0, str(REPO / "tests"))

from browser_testing import (  # noqa: E402
    chromium,
    click_panel,
    drag_voxels,
    open_medsam2_study,
    panel_state,
    wait_for,
)
from pacs_testing import Orthanc, lung_ct, write_ct_series  # noqa: E402

from conftest import start_server, stop_server  # noqa: E402
from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, save_checkpoint  # noqa: E402
from sam2_testing import REFERENCE_CHECKPOINT, REFERENCE_CONFIG, object_present_bias  # noqa: E402

KEY_SLICE = 20
TUMOUR_BOX = (317, 335, 385, 395)  # x0, y0, x1, y1 = i0, j0, i1, j1 of the lung2 tumour
APP_DEFAULTS = {"encode_ahead": "on", "warm_up": "on", "cpu_tracking": "fast", "cpu_encoder": "openvino"}


def device() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"


def direct_request(server, image: str, model: str, prompts: list[dict]) -> tuple[float, int]:
    """Seconds and answer bytes for the same prompts sent by HTTP, in a session of their own, asking for the
    whole label as an uncompressed NRRD (the panel's request before changed regions)."""
    params = {
        "prompts": prompts,
        "client_id": f"direct-{time.monotonic_ns()}",
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        "result_compress": False,
    }
    started = time.monotonic()
    r = requests.post(
        f"{server.url}/infer/{model}",
        params={"image": image, "output": "all"},
        files={"params": (None, json.dumps(params))},
        timeout=600,
    )
    r.raise_for_status()
    return time.monotonic() - started, len(r.content)


def draw_box(driver, image, box: tuple[int, int, int, int], k: int, dimension: str) -> dict:
    """Live-mode box on slice k; the panel's timing of its answer."""
    from browser_testing import jump_to_slice

    jump_to_slice(driver, k)
    click_panel(driver, dimension)
    runs = driver.execute_script("return window.medsam2.imageState().done.length")
    x0, y0, x1, y1 = box
    drag_voxels(driver, image, [(x0, y0), ((x0 + x1) / 2, (y0 + y1) / 2), (x1, y1)], k)
    wait_for(
        lambda: driver.execute_script("return window.medsam2.imageState().done.length") > runs
        or panel_state(driver, "error"),
        600,
        "the panel's answer",
    )
    assert panel_state(driver, "error") is None, panel_state(driver, "error")
    return panel_state(driver, "lastRun")


def measure(args, folder: Path) -> list[dict]:
    orthanc = Orthanc(folder / "orthanc").start()
    ct = write_ct_series(lung_ct(first_slice=0, num_slices=61, size=512), folder / "ct", description="lung2")
    orthanc.upload(ct.files)
    conf = {"window": "lung", **APP_DEFAULTS}
    if args.model == "reference":
        conf |= {"checkpoint": str(REFERENCE_CHECKPOINT), "model_config": str(REFERENCE_CONFIG)}
    else:
        checkpoint = folder / "random_medsam2.pt"
        save_checkpoint(object_present_bias(build_model(MEDSAM2_CONFIG)), checkpoint)
        conf["checkpoint"] = str(checkpoint)
    server = start_server(orthanc.dicomweb, conf, folder / "server.log", timeout=600)
    lines: list[dict] = []
    try:
        with chromium() as driver:
            open_medsam2_study(driver, server.url, ct.study_uid, KEY_SLICE)
            click_panel(driver, "tool-box")
            click_panel(driver, "live")
            time.sleep(args.think)
            cases = [("3d_one_label", "3d", KEY_SLICE)] + [("2d_box", "2d", KEY_SLICE + d) for d in (2, 4, 6)]
            for name, dimension, k in cases:
                run = draw_box(driver, ct.image, TUMOUR_BOX, k, dimension)
                model = run["model"]
                prompts = [{"label": "lesion", "slice": k, "box": list(TUMOUR_BOX)}]
                direct, whole_bytes = direct_request(server, ct.series_uid, model, prompts)
                timing = run["timing"]
                line = {
                    "bench": "ohif_box_to_overlay",
                    "case": name,
                    "image": "lung2 512x512x61",
                    "model": args.model,
                    "device": device(),
                    "load_average_1m": round(os.getloadavg()[0], 2),
                    "think_s": args.think,
                    "wire_bytes": run.get("bytes"),
                    "whole_label_bytes": whole_bytes,
                    "wire_over_whole": round(run["bytes"] / whole_bytes, 4) if run.get("bytes") else None,
                    "changed_region": run["answer"].get("changed_region"),
                    "box_release_to_overlay_s": round(timing["prompt_to_overlay_s"], 3),
                    "server_total_s": timing["server_s"],
                    "direct_http_s": round(direct, 3),
                    "browser_over_direct": round(timing["prompt_to_overlay_s"] / direct, 3),
                    "ready_at_request": run["answer"].get("session", {}).get("ready_at_request"),
                    "browser_phases_s": {
                        k: timing.get(k) for k in ("until_answer_s", "receive_s", "write_s", "frame_s")
                    },
                }
                print(json.dumps(line), flush=True)
                lines.append(line)
    finally:
        stop_server(server)
        orthanc.stop()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--think", type=float, default=20.0, help="seconds between opening the study and the box")
    parser.add_argument("--model", choices=("reference", "medsam2-random"), default="reference")
    parser.add_argument("--out", type=Path, help="also write the JSON lines here (appended)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ohif-bench-") as tmp:
        lines = measure(args, Path(tmp))
    if args.out:
        with args.out.open("a") as out:
            out.write("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
