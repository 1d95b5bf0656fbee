"""Sessions that free themselves, measured on a real server: more annotators than ``--conf max_live_sessions``
open a study each, the one over the cap gets the documented refusal (429, ``Retry-After``, what to do), and after
``--conf session_idle_timeout_s`` without requests the server's resident memory (RSS) is back near its idle
baseline.

The server runs the reference model (tests/fixtures/reference_sam2.pt, 128 input; memory held per session is the
image, its frames and the encoded slices, so the weights' quality does not matter) with the warm-up on. The
baseline is its idle RSS after one annotator has worked and left (their session timed out): what a server that
has served holds at rest; the RSS right after the start is reported too. Each annotator propagates a box through
their own volume (3D), so every slice is encoded and held; the viewers already open send their heartbeat before
the next annotator comes (as the OHIF panel does every 30 s), then stop (the annotators went home).
Prints one JSON line per measurement.

    python bench/session_limits.py --out bench/results/session_limits_cpu.jsonl
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
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))
sys.path.insert(0, str(REPO / "tests"))

from conftest import start_server, stop_server, write_image  # noqa: E402
from sam2_testing import REFERENCE_CHECKPOINT, REFERENCE_CONFIG, blob_volume  # noqa: E402


def server_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def settle_rss(pid: int, seconds: float = 3.0) -> int:
    """The smallest RSS seen over a few seconds (the server idle)."""
    samples = []
    end = time.time() + seconds
    while time.time() < end:
        samples.append(server_rss(pid))
        time.sleep(0.25)
    return min(samples)


def open_session(url: str, image: str, client: str, slices: int, size: int) -> requests.Response:
    c, r = size // 2, size // 8
    params = {
        "label": "lesion",
        "prompts": [{"label": "lesion", "slice": slices // 2, "box": [c - r, c - r, c + r, c + r]}],
    }
    params["client_id"] = client
    return requests.post(
        f"{url}/infer/medsam2_3d?image={image}&output=json", data={"params": json.dumps(params)}, timeout=900
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap", type=int, default=3, help="--conf max_live_sessions")
    parser.add_argument("--idle-s", type=float, default=45.0, help="--conf session_idle_timeout_s")
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines: list[dict[str, Any]] = []
    load = os.getloadavg()[0]
    device = (
        f"{os.cpu_count()} shared CPU cores ({platform.processor() or platform.machine()}), load average {load:.1f}"
    )

    def emit(line: dict[str, Any]) -> None:
        line = {"bench": "session_limits", "device": device, **line}
        lines.append(line)
        print(json.dumps(line), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        users = args.cap + 1
        for u in range(users + 1):  # the last one: the warm-up annotator
            volume = blob_volume((args.slices, args.size, args.size), radius=args.size / 8, seed=u)
            write_image(
                volume, studies / f"ct_{u}.nii.gz", (0.8, 0.8, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
            )
        conf = {
            "checkpoint": str(REFERENCE_CHECKPOINT),
            "model_config": str(REFERENCE_CONFIG),
            "window": "abdomen",
            "warm_up": "on",
            "encode_ahead": "off",
            "max_sessions": str(users + 2),  # the image cache would otherwise drop images before the cap is reached
            "max_live_sessions": str(args.cap),
            "session_idle_timeout_s": f"{args.idle_s:g}",
        }
        server = start_server(studies, conf, Path(tmp) / "server.log", timeout=600)
        try:
            pid = server.proc.pid
            wait_s = args.idle_s + max(1.0, min(30.0, args.idle_s / 10)) + 3  # the timeout and one reaper period
            fresh = settle_rss(pid)
            # one annotator works, then leaves: the server's idle state once it has served (code paths, thread
            # pools, kernels set up by a first real request stay; that session's memory must not)
            warm = open_session(server.url, f"ct_{users}", "warm-up", args.slices, args.size)
            time.sleep(wait_s)
            baseline = settle_rss(pid)
            emit(
                {
                    "kind": "baseline",
                    "fresh_start_rss_mb": round(fresh / 2**20, 1),
                    "warm_up_status": warm.status_code,
                    "rss_mb": round(baseline / 2**20, 1),
                    "cap": args.cap,
                    "idle_s": args.idle_s,
                    "volume": [args.slices, args.size, args.size],
                }
            )
            for u in range(users):
                for v in range(u):  # the viewers already open say so (docs/api.md), as the OHIF panel does
                    requests.post(f"{server.url}/medsam2/heartbeat", json={"image": f"ct_{v}"}, timeout=60)
                t0 = time.perf_counter()
                r = open_session(server.url, f"ct_{u}", f"annotator-{u}", args.slices, args.size)
                line = {
                    "kind": "open_session",
                    "annotator": u,
                    "status": r.status_code,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "rss_mb": round(server_rss(pid) / 2**20, 1),
                }
                if r.status_code != 200:
                    line |= {"retry_after": r.headers.get("Retry-After"), "detail": r.json().get("detail")}
                emit(line)
            peak = server_rss(pid)
            opened_at = time.time()
            time.sleep(wait_s)
            after = settle_rss(pid)
            retry = open_session(server.url, f"ct_{args.cap}", f"annotator-{args.cap}", args.slices, args.size)
            freed = (peak - after) / max(1, peak - baseline)
            emit(
                {
                    "kind": "summary",
                    "refused_over_cap": sum(1 for line in lines if line.get("status") == 429),
                    "baseline_rss_mb": round(baseline / 2**20, 1),
                    "fresh_start_rss_mb": round(fresh / 2**20, 1),
                    "after_idle_over_fresh_start": round(after / fresh, 3),
                    "peak_rss_mb": round(peak / 2**20, 1),
                    "after_idle_rss_mb": round(after / 2**20, 1),
                    "after_idle_over_baseline": round(after / baseline, 3),
                    "within_10_percent": after <= 1.10 * baseline,
                    "session_memory_freed_fraction": round(freed, 3),
                    "waited_s": round(time.time() - opened_at, 1),
                    "refused_annotator_served_after_timeout": retry.status_code,
                }
            )
        finally:
            stop_server(server)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
