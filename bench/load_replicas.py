"""Load test across replicas: N simulated annotators against TWO server replicas behind nginx and against ONE
replica behind the same nginx config, on one shared studies folder, in the same run.

Annotators, their images and their request scripts are bench/load.py's (imported, not copied): ``2d_new``,
``2d_encoded`` (x4), ``3d``, ``correction``, ``3d_add_label``, plus two label saves (``save``:
``PUT /datastore/label?image=...&tag=final`` with a NIfTI label on the image's grid and ``{"version": v}`` in
``params``), one after the correction and one at the end. nginx routes by the consistent hash of the ``image``
query parameter (deploy/nginx/medsam2-replicas.conf, rendered by scripts/replicas.py), so each annotator's
requests meet one replica; the ``x-served-by`` answer header is counted per replica.

Correctness, per run: every inference answer is compared voxel for voxel with the same request run alone
(each annotator's script run once, sequentially, through nginx on the single replica, before the runs), and
after the run every replica of the set must list each image's last acknowledged save (``GET
/datastore/?output=all``, the version put into ``params``) and the label file must hold that save's voxels
(``labels_lost``). Both replica sets are started at the start and stay up (the idle one sleeps); runs go
1, 2 replicas at the first N and 2, 1 at the next (ABBA), so a slow drift of a shared machine's load partly
cancels out. Each run has a deadline (``--max-seconds``): annotators start no request after it, and what
they did not start is reported.

Fair on the same cores: every replica set gets the same total of torch/OpenMP threads (``--threads``,
default: the cores this process may use), split evenly over its replicas (``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` per replica process; ``OMP_WAIT_POLICY=PASSIVE`` for all, as scripts/test.sh sets it).

Prints one JSON line per measurement (setup, reference, one per (replicas, N), summary with the throughput
ratio of each replica count against one replica at each N).

    python bench/load_replicas.py --out bench/results/load_replicas_cpu.jsonl   # CPU: N = 16, 64; 6 x 96 x 96
    python bench/load_replicas.py --quick                                       # a 3-minute check
    python bench/load_replicas.py --users 16,64,128 --slices 40 --size 512 --image-size 512 \\
        --device cuda --spread-gpus --max-seconds 600                          # one GPU per replica
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
import SimpleITK as sitk
import torch

BENCH = Path(__file__).resolve().parent
for folder in (BENCH, BENCH.parent / "scripts", BENCH.parent / "tests", BENCH.parent / "apps" / "medsam2"):
    sys.path.insert(0, str(folder))

from load import (  # noqa: E402
    KINDS,
    Annotator,
    make_studies,
    percentiles,
    server_rss,
    session_bytes_estimate,
)
from local_orthanc import free_port  # noqa: E402
from replicas import nginx_binary, render_nginx_conf, start_nginx, wait_ready  # noqa: E402

from conftest import Server, start_server, stop_server  # noqa: E402
from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, save_checkpoint  # noqa: E402
from sam2_testing import object_present_bias, small_config_file  # noqa: E402

ALL_KINDS = [*KINDS, "save"]
SAVE_STEP = ("save", "", {})


class ReplicaAnnotator(Annotator):
    """load.Annotator with label saves (kind ``save``) and the replica that answered each request."""

    def __init__(self, *args: Any, reference_image: sitk.Image, mask: np.ndarray, version_base: int, **kw: Any):
        super().__init__(*args, **kw)
        self.reference_image, self.mask, self.version_base = reference_image, mask, version_base

    def request(self, index: int, kind: str, model: str, params: dict) -> dict[str, Any]:
        if kind == "save":
            return self.save(index)
        record = super().request(index, kind, model, params)
        return record

    def save(self, index: int) -> dict[str, Any]:
        version = self.version_base + index
        record: dict[str, Any] = {"step": index, "kind": "save", "refused": 0, "version": version}
        body = label_bytes(self.reference_image, label_voxels(self.mask, version))
        t0 = time.monotonic()
        try:
            r = requests.put(
                f"{self.url}/datastore/label",
                params={"image": self.image, "tag": "final"},
                files={"label": (f"{self.image}.nii.gz", body)},
                data={"params": json.dumps({"version": version})},
                timeout=600,
            )
        except requests.RequestException as e:
            record.update(error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0, unknown_outcome=True)
            return record
        record["seconds"] = time.monotonic() - t0
        record["served_by"] = r.headers.get("x-served-by")
        if r.status_code == 200:
            record["acknowledged"] = True
        else:
            record["error"] = f"HTTP {r.status_code}: {r.text[:300]}"
            record["unknown_outcome"] = r.status_code >= 500  # a 502 from nginx: the replica may have saved it
        return record


def label_voxels(mask: np.ndarray, version: int) -> np.ndarray:
    """The image's label for save ``version``: its bright object, less one voxel chosen by the version."""
    label = mask.copy()
    voxels = np.flatnonzero(label)
    if voxels.size:
        label.flat[voxels[version % voxels.size]] = 0
    return label


def label_bytes(reference: sitk.Image, voxels: np.ndarray) -> bytes:
    """A .nii.gz of ``voxels`` on the grid of ``reference``."""
    image = sitk.GetImageFromArray(voxels)
    image.CopyInformation(reference)
    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as f:
        sitk.WriteImage(image, f.name)
        return Path(f.name).read_bytes()


class ReplicaSet:
    """``count`` replicas (``start_server`` processes) on one studies folder behind one nginx."""

    def __init__(
        self, count: int, studies: Path, conf: dict[str, str], threads: int, work: Path, gpus: int, env: dict[str, str]
    ):
        self.count, self.threads = count, threads
        names = [f"solo{count}" if count == 1 else f"x{count}r{i + 1}" for i in range(count)]

        def start(i: int) -> Server:
            own = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            if gpus:
                own["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            log = work / f"{names[i]}.log"
            return start_server(studies, {**conf, "replica_name": names[i]}, log, 600, own, own_process_group=True)

        with ThreadPoolExecutor(count) as pool:
            self.replicas = dict(zip(names, pool.map(start, range(count)), strict=True))
        port = free_port()
        upstreams = [s.url[len("http://") :] for s in self.replicas.values()]
        self.nginx = start_nginx(render_nginx_conf(f"127.0.0.1:{port}", upstreams, work / f"nginx_{count}"))
        self.url = f"http://127.0.0.1:{port}"
        wait_ready(self.url, 60)

    def stop(self) -> None:
        self.nginx.terminate()
        self.nginx.wait(timeout=30)
        for server in self.replicas.values():
            stop_server(server)


class RssSampler(threading.Thread):
    """The largest RSS of each replica process while a run is under way."""

    def __init__(self, replica_set: ReplicaSet, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.replica_set, self.every_s = replica_set, every_s
        self.peak = dict.fromkeys(replica_set.replicas, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, server in self.replica_set.replicas.items():
                self.peak[name] = max(self.peak[name], server_rss(server.proc.pid))
            self.stop.wait(self.every_s)


def run_annotators(
    url: str,
    scripts: list[dict],
    users: int,
    run_name: str,
    think_s: float,
    max_seconds: float,
    labels: dict,
    version_base: int,
) -> tuple[list[ReplicaAnnotator], float]:
    """All ``users`` annotators at once (starts spread over one think time); (annotators, wall seconds)."""
    deadline = time.monotonic() + max_seconds
    annotators = [
        make_annotator(url, s, f"{run_name}-u{u}", think_s, u * think_s / users, deadline, labels, version_base)
        for u, s in enumerate(scripts[:users])
    ]
    t0 = time.monotonic()
    for a in annotators:
        a.start()
    for a in annotators:
        a.join()
    return annotators, time.monotonic() - t0


def make_annotator(
    url: str, script: dict, client_id: str, think_s: float, start_s: float, deadline: float, labels: dict, base: int
) -> ReplicaAnnotator:
    reference_image, mask = labels[script["image"]]
    return ReplicaAnnotator(
        url,
        script["image"],
        script["steps"],
        client_id,
        think_s,
        start_s,
        deadline,
        reference_image=reference_image,
        mask=mask,
        version_base=base,
    )


def check_saves(replica_set: ReplicaSet, annotators: list[ReplicaAnnotator], studies: Path) -> dict[str, Any]:
    """Each image's last acknowledged save, listed by every replica and on disk (saves of one image are
    sequential, so the last acknowledged one, or a later save whose outcome is unknown, must be there)."""
    listings = {
        name: requests.get(f"{s.url}/datastore/?output=all", timeout=120).json()["objects"]
        for name, s in replica_set.replicas.items()
    }
    lost, checked, detail = 0, 0, []
    for a in annotators:
        saves = [r for r in a.records if r["kind"] == "save"]
        acked = [r["version"] for r in saves if r.get("acknowledged")]
        if not acked:
            continue
        checked += 1
        allowed = {acked[-1], *(r["version"] for r in saves if r.get("unknown_outcome") and r["version"] > acked[-1])}
        listed = {
            name: objects.get(a.image, {}).get("labels", {}).get("final", {}).get("info", {}).get("version")
            for name, objects in listings.items()
        }
        on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(studies / "labels" / "final" / f"{a.image}.nii.gz")))
        whole = any(np.array_equal(on_disk, label_voxels(a.mask, v)) for v in allowed)
        if not whole or any(v not in allowed for v in listed.values()):
            lost += 1
            detail.append({"image": a.image, "acknowledged": acked[-1], "listed": listed, "voxels_match": whole})
    return {"labels_checked": checked, "labels_lost": lost, "labels_lost_detail": detail[:5]}


def summarize(
    replica_set: ReplicaSet,
    users: int,
    annotators: list[ReplicaAnnotator],
    seconds: float,
    reference: dict[tuple[int, int], np.ndarray],
    saves: dict[str, Any],
    rss: RssSampler,
) -> dict[str, Any]:
    records = [(u, r) for u, a in enumerate(annotators) for r in a.records]
    ok = [(u, r) for u, r in records if "error" not in r]
    errors = [r["error"] for _, r in records if "error" in r]
    mismatches = []
    for u, r in ok:
        if r["kind"] == "save":
            continue
        ref = reference.get((u, r["step"]))
        if ref is None or not np.array_equal(ref, r["label"]):
            differing = None if ref is None else int((ref != r["label"]).sum())
            mismatches.append({"user": u, "step": r["step"], "kind": r["kind"], "voxels_differing": differing})
    served_by: dict[str, int] = {}
    replicas_per_image = []
    for a in annotators:
        names = {r.get("served_by") for r in a.records if r.get("served_by")}
        replicas_per_image.append(len(names))
        for r in a.records:
            if r.get("served_by"):
                served_by[r["served_by"]] = served_by.get(r["served_by"], 0) + 1
    planned = sum(len(a.steps) for a in annotators)
    infer_ok = [(u, r) for u, r in ok if r["kind"] != "save"]
    return {
        "measurement": "run",
        "replicas": replica_set.count,
        "threads_per_replica": replica_set.threads,
        "users": users,
        "requests_planned": planned,
        "requests": len(records),
        "requests_ok": len(ok),
        "requests_not_started": planned - len(records),
        "annotators_unfinished": sum(a.truncated for a in annotators),
        "truncated": any(a.truncated for a in annotators),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(ok) / seconds, 3),
        "latency_s": {k: percentiles([r["seconds"] for _, r in ok if r["kind"] == k]) for k in ALL_KINDS},
        "queue_wait_s": {
            k: percentiles([r["server"].get("queue_wait", 0) for _, r in infer_ok if r["kind"] == k]) for k in KINDS
        },
        "errors": len(errors),
        "error_detail": errors[:5],
        "refused_503": sum(r["refused"] for _, r in records),
        "compared": len(infer_ok),
        "mismatches": len(mismatches),
        "mismatch_detail": mismatches[:10],
        "saves_acknowledged": sum(1 for _, r in ok if r.get("acknowledged")),
        **saves,
        "served_by": dict(sorted(served_by.items())),
        "images_on_more_than_one_replica": sum(n > 1 for n in replicas_per_image),
        "replica_rss_max_gib": {k: round(v / (1 << 30), 3) for k, v in rss.peak.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="16,64", help="annotator counts, one run per replica count each")
    parser.add_argument("--replicas", default="1,2", help="replica counts; the first is the baseline")
    parser.add_argument("--slices", type=int, default=6, help="slices per generated volume")
    parser.add_argument("--size", type=int, default=96, help="rows and columns per generated slice")
    parser.add_argument("--image-size", type=int, default=256, help="model input size (MedSAM2's is 512)")
    parser.add_argument("--think-s", type=float, default=1.0, help="pause between an annotator's requests")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="per run: no new request after this")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per replica set (default: cores)")
    parser.add_argument("--concurrency", type=int, default=None, help="max_concurrent_infers per replica")
    parser.add_argument("--max-queued", type=int, default=None, help="max_queued_infers per replica")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of every replica ('': unset)")
    parser.add_argument("--device", default=None, help="--conf device for every replica (default: the app's)")
    parser.add_argument("--spread-gpus", action="store_true", help="replica i sees only GPU i (mod GPU count)")
    parser.add_argument("--quick", action="store_true", help="N = 2, 6; 6 x 64 x 64; 128 input; 60 s per run")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder (studies, replica logs)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    if parser.parse_known_args()[0].quick:  # the preset's values, unless given on the command line
        parser.set_defaults(users="2,6", slices=6, size=64, image_size=128, max_seconds=60.0, think_s=0.2)
    args = parser.parse_args()
    user_counts = [int(n) for n in args.users.split(",")]
    replica_counts = [int(n) for n in args.replicas.split(",")]
    most = max(user_counts)
    cores = len(os.sched_getaffinity(0))
    threads_total = args.threads or cores
    gpus = torch.cuda.device_count() if args.spread_gpus else 0

    def emit(line: dict[str, Any]) -> None:
        text = json.dumps({"bench": "load_replicas", **line})
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")

    nginx_binary()
    work = Path(tempfile.mkdtemp(prefix="medsam2_load_replicas_"))
    studies = work / "studies"
    scripts = make_studies(studies, most, args.slices, args.size)
    for s in scripts:  # two label saves: after the correction, and at the end
        s["steps"] = [*s["steps"][:5], SAVE_STEP, *s["steps"][5:], SAVE_STEP]
    labels = {}
    for s in scripts:
        image = sitk.ReadImage(str(studies / f"{s['image']}.nii.gz"))
        labels[s["image"]] = (image, (sitk.GetArrayFromImage(image) > 150).astype(np.uint8))
    torch.manual_seed(0)
    conf = {"window": "abdomen", "max_sessions": str(4 * most + 8)}
    config = MEDSAM2_CONFIG
    if args.image_size != 512:
        config = small_config_file(work, args.image_size)
        conf["model_config"] = str(config)
    conf["checkpoint"] = str(work / "random_medsam2.pt")
    save_checkpoint(object_present_bias(build_model(config)), Path(conf["checkpoint"]))
    # one fine-tuned path for every replica (none is there: all serve the checkpoint above)
    conf["finetuned_checkpoint"] = str(work / "shared_model" / "finetuned.pt")
    conf["max_session_gb"] = str(
        round(1.5 * most * session_bytes_estimate(args.slices, args.size, args.image_size) / (1 << 30), 4)
    )
    for key, value in (("max_concurrent_infers", args.concurrency), ("max_queued_infers", args.max_queued)):
        if value is not None:
            conf[key] = str(value)
    if args.device:
        conf["device"] = args.device

    env = {"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}
    t_start = time.monotonic()
    sets: dict[int, ReplicaSet] = {}
    try:
        for count in replica_counts:  # one after the other: parallel starts would fight over the cores
            sets[count] = ReplicaSet(count, studies, conf, max(1, threads_total // count), work, gpus, env)
        baseline = sets[replica_counts[0]]
        info = {n: requests.get(f"{s.url}/info/", timeout=60).json() for n, s in baseline.replicas.items()}
        nginx_version = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip()
        order = [
            (users, count)
            for i, users in enumerate(user_counts)
            for count in (replica_counts if i % 2 == 0 else replica_counts[::-1])
        ]
        emit(
            {
                "measurement": "setup",
                "host": platform.node(),
                "cpu": platform.processor() or platform.machine(),
                "cores": cores,
                "gpus": torch.cuda.device_count(),
                "torch": torch.__version__,
                "nginx": nginx_version,
                "model": f"hiera-t {args.image_size} (MedSAM2 shape, random weights)",
                "volume_kji": [args.slices, args.size, args.size],
                "users": user_counts,
                "replicas": replica_counts,
                "threads_total_per_set": threads_total,
                "threads_per_replica": {str(c): s.threads for c, s in sets.items()},
                "replica_env": env,
                "run_order": [f"{c}x{u}" for u, c in order],
                "requests_per_annotator": len(scripts[0]["steps"]),
                "kinds": [kind for kind, *_ in scripts[0]["steps"]],
                "think_s": args.think_s,
                "max_seconds_per_run": args.max_seconds,
                "conf": {
                    k: v for k, v in conf.items() if k not in ("checkpoint", "model_config", "finetuned_checkpoint")
                },
                "admission": next(iter(info.values()))["admission"],
                "start_s": round(time.monotonic() - t_start, 1),
            }
        )
        # model load and first-call costs, on every replica, outside every measurement
        for replica_set in sets.values():
            for name, server in replica_set.replicas.items():
                steps = scripts[0]["steps"][:3]
                make_annotator(
                    server.url, {**scripts[0], "steps": steps}, f"warm-{name}", 0, 0, math.inf, labels, 0
                ).run()
        # references: each annotator's script alone, one after the other, through nginx on the baseline set
        t0, load_before = time.monotonic(), os.getloadavg()[0]
        reference: dict[tuple[int, int], np.ndarray] = {}
        ref_errors, ref_served, ref_records = [], {}, []
        for u, script in enumerate(scripts):
            alone = make_annotator(baseline.url, script, f"ref-u{u}", 0, 0, math.inf, labels, 0)
            alone.run()
            ref_records += alone.records
            for rec in alone.records:
                if "error" in rec:
                    ref_errors.append(rec["error"])
                elif "label" in rec:
                    reference[(u, rec["step"])] = rec["label"]
                if rec.get("served_by"):
                    ref_served[rec["served_by"]] = ref_served.get(rec["served_by"], 0) + 1
        nonempty = [bool(label.any()) for label in reference.values()]
        emit(
            {
                "measurement": "reference",
                "replicas": baseline.count,
                "requests": sum(len(s["steps"]) for s in scripts),
                "inference_answers": len(reference),
                "errors": len(ref_errors),
                "error_detail": ref_errors[:3],
                "seconds": round(time.monotonic() - t0, 1),
                "nonempty_masks": round(float(np.mean(nonempty)), 3) if nonempty else None,
                "served_by": ref_served,
                "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "latency_s": {
                    k: percentiles([r["seconds"] for r in ref_records if r["kind"] == k and "error" not in r])
                    for k in ALL_KINDS
                },
            }
        )

        results = []
        for run_index, (users, count) in enumerate(order, start=1):
            replica_set = sets[count]
            rss = RssSampler(replica_set)
            rss.start()
            load_before = os.getloadavg()[0]
            name = f"x{count}-n{users}"
            annotators, seconds = run_annotators(
                replica_set.url, scripts, users, name, args.think_s, args.max_seconds, labels, 1000 * run_index
            )
            rss.stop.set()
            rss.join()
            saves = check_saves(replica_set, annotators, studies)
            line = summarize(replica_set, users, annotators, seconds, reference, saves, rss)
            line["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
            results.append(line)
            emit(line)
        emit(summary(results, replica_counts))
    finally:
        for replica_set in sets.values():
            replica_set.stop()
        if args.keep_work:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def summary(results: list[dict[str, Any]], replica_counts: list[int]) -> dict[str, Any]:
    """Throughput of each replica count over the baseline's at each N, and the correctness totals."""
    by = {(r["users"], r["replicas"]): r for r in results}
    base = replica_counts[0]
    ratios = {
        f"{count}_vs_{base}_at_{users}": round(
            by[(users, count)]["throughput_rps"] / by[(users, base)]["throughput_rps"], 3
        )
        for users, c in by
        for count in [c]
        if count != base and by[(users, base)]["throughput_rps"]
    }
    return {
        "measurement": "summary",
        "throughput_ratio": ratios,
        "throughput_rps": {f"{c}x{u}": r["throughput_rps"] for (u, c), r in by.items()},
        "errors": sum(r["errors"] for r in results),
        "refused_503": sum(r["refused_503"] for r in results),
        "mismatches": sum(r["mismatches"] for r in results),
        "compared": sum(r["compared"] for r in results),
        "labels_lost": sum(r["labels_lost"] for r in results),
        "labels_checked": sum(r["labels_checked"] for r in results),
        "requests_not_started": sum(r["requests_not_started"] for r in results),
        "images_on_more_than_one_replica": sum(r["images_on_more_than_one_replica"] for r in results),
        "correct": all(r["mismatches"] == 0 and r["labels_lost"] == 0 for r in results),
    }


if __name__ == "__main__":
    main()
