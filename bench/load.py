"""Load test: N simulated annotators on one real MONAI Label server running this app, each on their own image,
each doing a fixed mix of 2D boxes, 3D propagations, a correction and a second label in their own session.

Every returned label is compared with the label of the same request run alone (each annotator's script run
once, sequentially, on the same server, before the load runs): identical masks mean no state leaks between
annotators. The server's session cache (bytes held, from ``/info/``) and its RSS are sampled during each run.

Prints one JSON line per measurement (setup, reference, one per N, summary).

    python bench/load.py --out bench/results/load_cpu.jsonl     # CPU: N = 1, 4, 16; 12 x 96 x 96 volumes, 256 input
    python bench/load.py --users 1,2 --slices 6 --image-size 128 --think-s 0.2   # a quick check

Requests per annotator (kind: what it measures):
``2d_new`` a box on the key slice of a fresh session (encodes that slice); ``2d_encoded`` a box or clicks on an
already-encoded slice (x4); ``3d`` the box propagated through the volume (encodes the other slices);
``correction`` a click on another slice with ``correction: true``; ``3d_add_label`` a second label's box (both
labels propagated again). Annotators wait ``--think-s`` between requests (a person looking at the answer) and
retry a 503 after its ``Retry-After`` (up to 3 times).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
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

from conftest import start_server, stop_server, write_image  # noqa: E402
from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, save_checkpoint  # noqa: E402
from lib.engine.precision import compute_dtype_for  # noqa: E402
from sam2_testing import blob_volume, object_present_bias, small_config_file  # noqa: E402

KINDS = ["2d_new", "2d_encoded", "3d", "correction", "3d_add_label"]


def make_studies(folder: Path, users: int, slices: int, size: int) -> list[dict[str, Any]]:
    """One CT-like volume per annotator (a bright ellipsoid in noise, at a different place in each) and
    the annotator's request script on it."""
    folder.mkdir(parents=True, exist_ok=True)
    scripts = []
    for u in range(users):
        rng = np.random.default_rng(u)
        radius = size * rng.uniform(0.12, 0.18)
        cy, cx = (size / 2 + rng.uniform(-0.15, 0.15, 2) * size).tolist()
        volume = blob_volume((slices, size, size), center=(slices / 2, cy, cx), radius=radius, seed=u)
        image = f"img{u:02d}"
        write_image(volume, folder / f"{image}.nii.gz", (0.8, 0.8, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        scripts.append({"image": image, "steps": annotator_script(slices, size, cx, cy, radius)})
    return scripts


def annotator_script(slices: int, size: int, cx: float, cy: float, radius: float) -> list[tuple[str, str, dict]]:
    """(kind, model, params) in order; client_id is added per run."""

    def box(scale: float) -> list[int]:
        rx, ry = 1.2 * radius * scale, radius * scale
        return [max(0, int(cx - rx)), max(0, int(cy - ry)), min(size - 1, int(cx + rx)), min(size - 1, int(cy + ry))]

    k0 = slices // 2
    x, y = int(cx), int(cy)

    def lesion(k: int, scale: float = 1.0, **extra) -> dict:
        return {"prompts": [{"label": "lesion", "slice": k, "box": box(scale), **extra}]}

    return [
        ("2d_new", "medsam2_2d", lesion(k0)),
        ("2d_encoded", "medsam2_2d", lesion(k0, 0.8, foreground=[[x, y]])),
        ("3d", "medsam2_3d", lesion(k0)),
        ("2d_encoded", "medsam2_2d", lesion(k0 + 1)),
        # Slicer's form: IJK clicks, the flag that adds them to the label's key slices
        ("correction", "medsam2_3d", {"label": "lesion", "foreground": [[x, y, k0 + 2]], "correction": True}),
        ("2d_encoded", "medsam2_2d", lesion(k0 - 1, 1.1)),
        ("3d_add_label", "medsam2_3d", {"prompts": [{"label": "organ", "slice": k0 - 1, "box": box(1.6)}]}),
        ("2d_encoded", "medsam2_2d", lesion(k0 + 2, 0.9, background=[[1, 1]])),
    ]


def split_multipart(response: requests.Response) -> tuple[np.ndarray | None, dict | None]:
    """(label array (k, j, i), result JSON) from MONAI Label's ``output=all`` answer."""
    boundary = response.headers["content-type"].split("boundary=")[1].encode()
    result, label = None, None
    for part in response.content.split(b"--" + boundary):
        head, _, body = part.partition(b"\r\n\r\n")
        body = body.rstrip(b"\r\n")
        if b"application/json" in head:
            result = json.loads(body)
        elif body and b"filename" in head:
            with tempfile.NamedTemporaryFile(suffix=".nii.gz") as f:
                f.write(body)
                f.flush()
                label = sitk.GetArrayFromImage(sitk.ReadImage(f.name))
    return label, result


class Annotator(threading.Thread):
    """Runs one script against the server, records every answer."""

    def __init__(self, url: str, image: str, steps: list, client_id: str, think_s: float, start_s: float, deadline):
        super().__init__(daemon=True)
        self.url, self.image, self.steps, self.client_id = url, image, steps, client_id
        self.think_s, self.start_s, self.deadline = think_s, start_s, deadline
        self.records: list[dict[str, Any]] = []
        self.truncated = False

    def run(self) -> None:
        time.sleep(self.start_s)
        for index, (kind, model, params) in enumerate(self.steps):
            if time.monotonic() > self.deadline:
                self.truncated = True
                return
            self.records.append(self.request(index, kind, model, {**params, "client_id": self.client_id}))
            time.sleep(self.think_s)

    def request(self, index: int, kind: str, model: str, params: dict) -> dict[str, Any]:
        record: dict[str, Any] = {"step": index, "kind": kind, "refused": 0}
        for _ in range(4):
            t0 = time.monotonic()
            try:
                r = requests.post(
                    f"{self.url}/infer/{model}?image={self.image}&output=all",
                    data={"params": json.dumps(params)},
                    timeout=600,
                )
            except requests.RequestException as e:
                record.update(error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)
                return record
            record["seconds"] = time.monotonic() - t0
            record["served_by"] = r.headers.get("x-served-by")  # the replica (bench/load_replicas.py)
            if r.status_code == 503 and "Retry-After" in r.headers:
                record["refused"] += 1
                record["retry_after"] = int(r.headers["Retry-After"])
                time.sleep(min(record["retry_after"], 30))
                continue
            if r.status_code != 200:
                record["error"] = f"HTTP {r.status_code}: {r.text[:300]}"
                return record
            label, result = split_multipart(r)
            record["label"] = label
            record["server"] = (result or {}).get("latencies", {})
            record["reused"] = (result or {}).get("session", {}).get("reused")
            record["device"] = (result or {}).get("model", {}).get("device")
            return record
        record["error"] = "still refused (503) after 3 retries"
        return record


class Sampler(threading.Thread):
    """Polls ``/info/`` (session cache, admission) and the server's RSS while a run is under way."""

    def __init__(self, url: str, pid: int, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.url, self.pid, self.every_s = url, pid, every_s
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            sample: dict[str, Any] = {"rss": server_rss(self.pid)}
            try:
                info = requests.get(f"{self.url}/info/", timeout=60).json()
                sample["info_s"] = time.monotonic() - t0
                sample["cache"] = info["session_cache"]["medsam2"]
                sample["admission"] = info["admission"]
            except (requests.RequestException, ValueError, KeyError) as e:
                sample["error"] = str(e)
            self.samples.append(sample)
            self.stop.wait(self.every_s)


def server_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def run_annotators(url, scripts, users, run_name, think_s, max_seconds) -> tuple[list[Annotator], float]:
    deadline = time.monotonic() + max_seconds
    annotators = [
        Annotator(url, s["image"], s["steps"], f"{run_name}-u{u}", think_s, u * think_s / users, deadline)
        for u, s in enumerate(scripts[:users])
    ]
    t0 = time.monotonic()
    for a in annotators:
        a.start()
    for a in annotators:
        a.join()
    return annotators, time.monotonic() - t0


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    p = [float(v) for v in np.percentile(values, [50, 95, 99])]
    return {
        "n": len(values),
        "p50": round(p[0], 3),
        "p95": round(p[1], 3),
        "p99": round(p[2], 3),
        "max": round(max(values), 3),
    }


def session_bytes_estimate(slices: int, size: int, image_size: int, labels: int = 2) -> int:
    """One annotator's session: cached features of every slice (4 x image_size^2 values over SAM2's three
    levels, bf16 or fp32 as the server stores them), the last low-res logits per label, frames and image."""
    feature_bytes = 2 if compute_dtype_for(torch.device("cpu")) == torch.bfloat16 else 4
    features = slices * 4 * image_size**2 * feature_bytes
    logits = labels * slices * (image_size // 4) ** 2 * 2
    return features + logits + slices * size * size * (1 + 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="1,4,16", help="annotator counts, one run each")
    parser.add_argument("--slices", type=int, default=12, help="slices per generated volume")
    parser.add_argument("--size", type=int, default=96, help="rows and columns per generated slice")
    parser.add_argument("--image-size", type=int, default=256, help="model input size (MedSAM2's is 512)")
    parser.add_argument("--think-s", type=float, default=1.0, help="pause between an annotator's requests")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="per run: no new request after this")
    parser.add_argument("--concurrency", type=int, default=None, help="--conf max_concurrent_infers (default: app's)")
    parser.add_argument("--max-queued", type=int, default=None, help="--conf max_queued_infers (default: app's)")
    parser.add_argument("--max-session-gb", type=float, default=None, help="cache cap (default: 1.5 x the largest N)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()
    user_counts = [int(n) for n in args.users.split(",")]
    most = max(user_counts)

    def emit(line: dict[str, Any]) -> None:
        text = json.dumps({"bench": "load", **line})
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")

    work = Path(tempfile.mkdtemp(prefix="medsam2_load_"))
    scripts = make_studies(work / "studies", most, args.slices, args.size)
    torch.manual_seed(0)
    conf = {"window": "abdomen", "max_sessions": str(4 * most + 8)}
    config = MEDSAM2_CONFIG
    if args.image_size != 512:
        config = small_config_file(work, args.image_size)
        conf["model_config"] = str(config)
    conf["checkpoint"] = str(work / "random_medsam2.pt")
    save_checkpoint(object_present_bias(build_model(config)), Path(conf["checkpoint"]))
    estimate = session_bytes_estimate(args.slices, args.size, args.image_size)
    cap_gb = args.max_session_gb or round(1.5 * most * estimate / (1 << 30), 4)
    conf["max_session_gb"] = str(cap_gb)
    if args.concurrency is not None:
        conf["max_concurrent_infers"] = str(args.concurrency)
    if args.max_queued is not None:
        conf["max_queued_infers"] = str(args.max_queued)

    t_start = time.monotonic()
    server = start_server(work / "studies", conf, work / "server.log", timeout=300)
    try:
        info = requests.get(f"{server.url}/info/", timeout=60).json()
        emit(
            {
                "measurement": "setup",
                "host": platform.node(),
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "model": f"hiera-t {args.image_size} (MedSAM2 shape, random weights)",
                "volume_kji": [args.slices, args.size, args.size],
                "users": user_counts,
                "requests_per_annotator": len(scripts[0]["steps"]),
                "think_s": args.think_s,
                "conf": {k: v for k, v in conf.items() if k not in ("checkpoint", "model_config")},
                "admission": info["admission"],
                "session_bytes_estimate": estimate,
                "server_start_s": round(time.monotonic() - t_start, 1),
            }
        )
        # model load and first-call costs, outside every measurement
        warm = Annotator(server.url, scripts[0]["image"], scripts[0]["steps"][:3], "warmup", 0, 0, math.inf)
        warm.run()
        # references: each annotator's script alone, one after the other
        t0 = time.monotonic()
        reference: dict[tuple[int, int], np.ndarray] = {}
        ref_errors = []
        for u, script in enumerate(scripts):
            alone = Annotator(server.url, script["image"], script["steps"], f"ref-u{u}", 0, 0, math.inf)
            alone.run()
            for rec in alone.records:
                if "label" in rec:
                    reference[(u, rec["step"])] = rec["label"]
                else:
                    ref_errors.append(rec.get("error"))
        nonempty = [bool(label.any()) for label in reference.values()]
        held = requests.get(f"{server.url}/info/", timeout=60).json()["session_cache"]["medsam2"]
        emit(
            {
                "measurement": "reference",
                "requests": len(reference),
                "errors": len(ref_errors),
                "error_detail": ref_errors[:3],
                "seconds": round(time.monotonic() - t0, 1),
                "nonempty_masks": round(float(np.mean(nonempty)), 3) if nonempty else None,
                # every session is complete by now (all slices encoded); the warm-up one has one label less
                "session_bytes_measured_mean": held["bytes"] // max(1, held["sessions"]),
                "device": warm.records[0].get("device") if warm.records else None,
            }
        )

        results = []
        for users in user_counts:
            before = requests.get(f"{server.url}/info/", timeout=60).json()
            sampler = Sampler(server.url, server.proc.pid)
            sampler.start()
            annotators, seconds = run_annotators(
                server.url, scripts, users, f"n{users}", args.think_s, args.max_seconds
            )
            sampler.stop.set()
            sampler.join()
            after = requests.get(f"{server.url}/info/", timeout=60)
            line = summarize(users, annotators, seconds, reference, sampler, before, after)
            results.append(line)
            emit(line)
        emit(targets(results, cap_gb))
    finally:
        stop_server(server)


def summarize(users, annotators, seconds, reference, sampler, before, after) -> dict[str, Any]:
    records = [(u, r) for u, a in enumerate(annotators) for r in a.records]
    ok = [(u, r) for u, r in records if "label" in r]
    errors = [r["error"] for _, r in records if "error" in r]
    mismatches = []
    for u, r in ok:
        ref = reference.get((u, r["step"]))
        if ref is None or not np.array_equal(ref, r["label"]):
            differing = None if ref is None else int((ref != r["label"]).sum())
            mismatches.append({"user": u, "step": r["step"], "kind": r["kind"], "voxels_differing": differing})
    caches = [s["cache"] for s in sampler.samples if "cache" in s]
    final = after.json() if after.status_code == 200 else {}
    cache_after = final.get("session_cache", {}).get("medsam2", {})
    admission_after = final.get("admission", {})
    info_s = [s["info_s"] for s in sampler.samples if "info_s" in s]
    return {
        "measurement": "users",
        "users": users,
        "requests": len(records),
        "requests_ok": len(ok),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(ok) / seconds, 3),
        "latency_s": {k: percentiles([r["seconds"] for _, r in ok if r["kind"] == k]) for k in KINDS},
        "server_total_s": {
            k: percentiles([r["server"].get("total", 0) for _, r in ok if r["kind"] == k]) for k in KINDS
        },
        "queue_wait_s": {
            k: percentiles([r["server"].get("queue_wait", 0) for _, r in ok if r["kind"] == k]) for k in KINDS
        },
        "errors": len(errors),
        "error_detail": errors[:5],
        "refused_503": sum(r["refused"] for _, r in records),
        "compared": len(ok),
        "mismatches": len(mismatches),
        "mismatch_detail": mismatches[:10],
        "sessions_not_reused_after_first_request": sum(1 for _, r in ok if r["step"] > 0 and r.get("reused") is False),
        "session_cache": {
            "cap_bytes": cache_after.get("max_bytes"),
            "max_bytes_sampled": max((c["bytes"] for c in caches), default=None),
            "peak_bytes_reported": cache_after.get("peak_bytes"),
            "max_sessions_sampled": max((c["sessions"] for c in caches), default=None),
            "evictions_during_run": cache_after.get("evictions", 0)
            - before.get("session_cache", {}).get("medsam2", {}).get("evictions", 0),
            "samples": len(caches),
        },
        "admission": {k: admission_after.get(k) for k in ("peak_running", "peak_queued", "mean_service_s")},
        "server_rss_max_gib": round(max((s["rss"] for s in sampler.samples), default=0) / (1 << 30), 3),
        "info_latency_s": percentiles(info_s),
        "healthy_after": after.status_code == 200,
        "truncated": any(a.truncated for a in annotators),
    }


def targets(results: list[dict[str, Any]], cap_gb: float) -> dict[str, Any]:
    by_users = {r["users"]: r for r in results}
    top = by_users[max(by_users)]
    four = by_users.get(4)
    p95_2d = float(four["latency_s"]["2d_encoded"]["p95"]) if four and four["latency_s"]["2d_encoded"]["n"] else None
    peak = max((r["session_cache"]["peak_bytes_reported"] or 0) for r in results)
    sampled = max((r["session_cache"]["max_bytes_sampled"] or 0) for r in results)
    cap = int(cap_gb * (1 << 30))
    return {
        "measurement": "summary",
        "largest_n": top["users"],
        "zero_errors_at_largest_n": top["errors"] == 0,
        "zero_mismatches_at_largest_n": top["mismatches"] == 0 and top["requests_ok"] > 0,
        "p95_2d_encoded_at_4_s": p95_2d,
        "p95_2d_encoded_at_4_under_1s": None if p95_2d is None else p95_2d < 1.0,
        "cache_cap_bytes": cap,
        "cache_peak_bytes": peak,
        "cache_max_sampled_bytes": sampled,
        "cache_under_cap": bool(peak <= cap),
    }


if __name__ == "__main__":
    main()
