"""Load test: N simulated annotators on the real MONAI Label server running this app, each on their own image,
each doing a fixed mix of 2D boxes, 3D propagations, a correction and a second label in their own session.
Either against one server (the default) or against replica sets behind nginx (``--replicas 1,2``).

Requests per annotator (kind: what it measures):
``2d_new`` a box on the key slice of a fresh session (encodes that slice); ``2d_encoded`` a box or clicks on an
already-encoded slice (x4); ``3d`` the box propagated through the volume (encodes the other slices);
``correction`` a click on another slice with ``correction: true``; ``3d_add_label`` a second label's box (both
labels propagated again); with ``--saves`` (the default with replicas) ``save``, ``PUT /datastore/label`` of a
NIfTI label on the image's grid with ``{"version": v}`` in ``params``, after the correction and at the end.
Annotators wait ``--think-s`` between requests and retry a 503 after its ``Retry-After`` (up to 3 times); each
run has a deadline (``--max-seconds``), and what was not started is reported.

Correctness, per run: every inference answer is compared voxel for voxel with the same request run alone (each
annotator's script run once, one after the other, before the runs: on the server, or through nginx on the first
replica set); identical masks mean no state leaks between annotators. With saves, every server of the set must
list each image's last acknowledged save and the label file must hold its voxels (``labels_lost``).

One server: ``/info/`` is polled every 0.25 s for the session cache and the admission gate; the cache cap is
1.5 x the largest N's working set, so it binds without evicting the sessions in use.
Replicas: the replica sets (deploy/nginx/medsam2-replicas.conf rendered by scripts/replicas.py; consistent hash of
``image``, so an annotator stays on one replica; ``x-served-by`` counted) run side by side on one studies folder,
every set with the same torch threads in total (``--threads``, default the cores), runs in ABBA order; the summary
has each replica count's throughput over the first's at each N.

Prints one JSON line per measurement (setup, reference, one per run, summary).

    python bench/load.py --out bench/results/load_cpu.jsonl            # one server: N = 1, 4, 16; 12 x 96 x 96
    python bench/load.py --replicas 1,2 --out bench/results/load_replicas_cpu.jsonl   # N = 16, 64; 6 x 96 x 96
    python bench/load.py --quick                  # one server, N = 2, 6; 6 x 64 x 64, 128 input; ~2 min
    python bench/load.py --replicas 1,2 --quick   # the same through 1 and 2 replicas; ~3 min
    python bench/load.py --replicas 1,2 --users 16,64,128 --slices 40 --size 512 --image-size 512 \\
        --device cuda --spread-gpus --max-seconds 600                 # one GPU per replica
"""

from __future__ import annotations

import argparse
import json
import math
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
from common import JsonLines, loadavg, machine, percentiles, process_rss, random_checkpoint_conf, use_repo_paths

use_repo_paths()

from local_orthanc import free_port  # noqa: E402
from replicas import nginx_binary, render_nginx_conf, start_nginx, wait_ready  # noqa: E402

from conftest import Server, start_server, stop_server, write_image  # noqa: E402
from lib.engine.precision import compute_dtype_for  # noqa: E402
from sam2_testing import blob_volume  # noqa: E402

KINDS = ["2d_new", "2d_encoded", "3d", "correction", "3d_add_label"]
ALL_KINDS = [*KINDS, "save"]
SAVE_STEP = ("save", "", {})
# the settings of each mode, and of --quick, unless given on the command line
ONE_SERVER = {"users": "1,4,16", "slices": 12, "max_seconds": 240.0}
REPLICAS = {"users": "16,64", "slices": 6, "max_seconds": 150.0}
QUICK = {"users": "2,6", "slices": 6, "size": 64, "image_size": 128, "max_seconds": 60.0, "think_s": 0.2}


# ----- the studies and each annotator's script -----


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


def add_saves(scripts: list[dict[str, Any]], studies: Path) -> dict[str, tuple[sitk.Image, np.ndarray]]:
    """Two label saves per script (after the correction, and at the end); returns each image and its bright
    object, from which every saved label is made (:func:`label_voxels`)."""
    labels = {}
    for s in scripts:
        s["steps"] = [*s["steps"][:5], SAVE_STEP, *s["steps"][5:], SAVE_STEP]
        image = sitk.ReadImage(str(studies / f"{s['image']}.nii.gz"))
        labels[s["image"]] = (image, (sitk.GetArrayFromImage(image) > 150).astype(np.uint8))
    return labels


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


def session_bytes_estimate(slices: int, size: int, image_size: int, labels: int = 2) -> int:
    """One annotator's session: cached features of every slice (4 x image_size^2 values over SAM2's three
    levels, bf16 or fp32 as the server stores them), the last low-res logits per label, frames and image."""
    feature_bytes = 2 if compute_dtype_for(torch.device("cpu")) == torch.bfloat16 else 4
    features = slices * 4 * image_size**2 * feature_bytes
    logits = labels * slices * (image_size // 4) ** 2 * 2
    return features + logits + slices * size * size * (1 + 2)


# ----- an annotator -----


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
    """Runs one script against ``url``, records every answer (and the server that gave it, ``x-served-by``).

    ``label`` (the image and its object, from :func:`add_saves`) is needed for scripts with ``save`` steps; a
    save's version is ``version_base`` + its step, so that every run saves new versions."""

    def __init__(
        self,
        url: str,
        script: dict[str, Any],
        client_id: str,
        think_s: float = 0.0,
        start_s: float = 0.0,
        deadline: float = math.inf,
        label: tuple[sitk.Image, np.ndarray] | None = None,
        version_base: int = 0,
    ):
        super().__init__(daemon=True)
        self.url, self.image, self.steps, self.client_id = url, script["image"], script["steps"], client_id
        self.think_s, self.start_s, self.deadline = think_s, start_s, deadline
        self.label, self.version_base = label, version_base
        self.records: list[dict[str, Any]] = []
        self.truncated = False

    def run(self) -> None:
        time.sleep(self.start_s)
        for index, (kind, model, params) in enumerate(self.steps):
            if time.monotonic() > self.deadline:
                self.truncated = True
                return
            if kind == "save":
                self.records.append(self.save(index))
            else:
                self.records.append(self.infer(index, kind, model, {**params, "client_id": self.client_id}))
            time.sleep(self.think_s)

    def infer(self, index: int, kind: str, model: str, params: dict) -> dict[str, Any]:
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
            record["served_by"] = r.headers.get("x-served-by")
            if r.status_code == 503 and "Retry-After" in r.headers:
                record["refused"] += 1
                record["retry_after"] = int(r.headers["Retry-After"])
                time.sleep(min(record["retry_after"], 30))
                continue
            if r.status_code != 200:
                record["error"] = f"HTTP {r.status_code}: {r.text[:300]}"
                return record
            label, result = split_multipart(r)
            result = result or {}
            record.update(label=label, server=result.get("latencies", {}))
            record.update(reused=result.get("session", {}).get("reused"), device=result.get("model", {}).get("device"))
            return record
        record["error"] = "still refused (503) after 3 retries"
        return record

    def save(self, index: int) -> dict[str, Any]:
        assert self.label is not None, "a script with saves needs the image's label (add_saves)"
        version = self.version_base + index
        record: dict[str, Any] = {"step": index, "kind": "save", "refused": 0, "version": version}
        body = label_bytes(self.label[0], label_voxels(self.label[1], version))
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


# ----- the servers -----


class ServerSet:
    """``count`` servers on one studies folder: behind one nginx (``nginx``: replicas), or one server asked directly.

    ``threads`` (torch/OpenMP threads per server) and ``gpus`` (server i sees GPU i mod gpus) go into each
    server's environment, with ``env``."""

    def __init__(self, count: int, studies: Path, conf: dict[str, str], work: Path, nginx: bool, **kw: Any):
        assert nginx or count == 1, "without nginx there is one server"
        self.count, self.threads, self.nginx = count, kw.get("threads"), None
        names = [f"solo{count}" if count == 1 else f"x{count}r{i + 1}" for i in range(count)] if nginx else ["server"]

        def start(i: int) -> Server:
            own = dict(kw.get("env") or {})
            if self.threads:
                own.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
            if kw.get("gpus"):
                own["CUDA_VISIBLE_DEVICES"] = str(i % kw["gpus"])
            named = {**conf, "replica_name": names[i]} if nginx else conf
            return start_server(studies, named, work / f"{names[i]}.log", 600, own, own_process_group=nginx)

        with ThreadPoolExecutor(count) as pool:
            self.servers = dict(zip(names, pool.map(start, range(count)), strict=True))
        self.url = next(iter(self.servers.values())).url
        if nginx:
            port = free_port()
            upstreams = [s.url[len("http://") :] for s in self.servers.values()]
            self.nginx = start_nginx(render_nginx_conf(f"127.0.0.1:{port}", upstreams, work / f"nginx_{count}"))
            self.url = f"http://127.0.0.1:{port}"
            wait_ready(self.url, 60)

    def info(self) -> dict[str, Any]:
        """``/info/`` of the first server ({} when it does not answer)."""
        try:
            return requests.get(f"{next(iter(self.servers.values())).url}/info/", timeout=60).json()
        except (requests.RequestException, ValueError):
            return {}

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.terminate()
            self.nginx.wait(timeout=30)
        for server in self.servers.values():
            stop_server(server)


class Sampler(threading.Thread):
    """While a run is under way: the largest RSS of each server, and (``info``) ``/info/`` of the first server
    (session cache, admission) every ``every_s``."""

    def __init__(self, server_set: ServerSet, info: bool, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.server_set, self.with_info, self.every_s = server_set, info, every_s
        self.peak = dict.fromkeys(server_set.servers, 0)
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, server in self.server_set.servers.items():
                self.peak[name] = max(self.peak[name], process_rss(server.proc.pid))
            if self.with_info:
                self.samples.append(self.info_sample())
            self.stop.wait(self.every_s)

    def info_sample(self) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            info = requests.get(f"{self.server_set.url}/info/", timeout=60).json()
            return {"info_s": time.monotonic() - t0, "cache": info["session_cache"]["medsam2"]}
        except (requests.RequestException, ValueError, KeyError) as e:
            return {"error": str(e)}

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


# ----- a run and what it found -----


def run_annotators(
    url: str, scripts: list[dict], users: int, run_name: str, args: argparse.Namespace, labels: dict, base: int
) -> tuple[list[Annotator], float]:
    """All ``users`` annotators at once (starts spread over one think time); (annotators, wall seconds)."""
    deadline = time.monotonic() + args.max_seconds
    annotators = [
        Annotator(
            url, s, f"{run_name}-u{u}", args.think_s, u * args.think_s / users, deadline, labels.get(s["image"]), base
        )
        for u, s in enumerate(scripts[:users])
    ]
    t0 = time.monotonic()
    for a in annotators:
        a.start()
    for a in annotators:
        a.join()
    return annotators, time.monotonic() - t0


def warm_up(sets: dict[int, ServerSet], scripts: list[dict], labels: dict) -> None:
    """Model load and first-call costs on every server, outside every measurement."""
    first = {**scripts[0], "steps": [s for s in scripts[0]["steps"] if s[0] != "save"][:3]}
    for server_set in sets.values():
        for name, server in server_set.servers.items():
            Annotator(server.url, first, f"warm-{name}", label=labels.get(first["image"])).run()


def references(server_set: ServerSet, scripts: list[dict], labels: dict) -> tuple[dict, dict[str, Any]]:
    """Each annotator's script alone, one after the other: ({(user, step): label}, the reference line)."""
    t0, load_before = time.monotonic(), loadavg()
    reference: dict[tuple[int, int], np.ndarray] = {}
    records: list[dict[str, Any]] = []
    for u, script in enumerate(scripts):
        alone = Annotator(server_set.url, script, f"ref-u{u}", label=labels.get(script["image"]))
        alone.run()
        records += alone.records
        reference.update({(u, r["step"]): r["label"] for r in alone.records if r.get("label") is not None})
    errors = [r["error"] for r in records if "error" in r]
    nonempty = [bool(label.any()) for label in reference.values()]
    held = server_set.info().get("session_cache", {}).get("medsam2", {})
    line = {
        "measurement": "reference",
        "replicas": server_set.count if server_set.nginx else None,
        "requests": len(records),
        "inference_answers": len(reference),
        "errors": len(errors),
        "error_detail": errors[:3],
        "seconds": round(time.monotonic() - t0, 1),
        "nonempty_masks": round(float(np.mean(nonempty)), 3) if nonempty else None,
        "served_by": served_counts(records),
        "loadavg_1m": [load_before, loadavg()],
        "latency_s": {
            k: percentiles([r["seconds"] for r in records if r["kind"] == k and "error" not in r]) for k in ALL_KINDS
        },
        "device": next((r["device"] for r in records if r.get("device")), None),
    }
    if not server_set.nginx:  # every session is complete by now (all slices encoded)
        line["session_bytes_measured_mean"] = held.get("bytes", 0) // max(1, held.get("sessions", 0))
    return reference, line


def served_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """Requests per server that answered (``x-served-by``; absent without nginx)."""
    counts: dict[str, int] = {}
    for r in records:
        if r.get("served_by"):
            counts[r["served_by"]] = counts.get(r["served_by"], 0) + 1
    return dict(sorted(counts.items()))


def mismatches(annotators: list[Annotator], reference: dict) -> list[dict[str, Any]]:
    """Inference answers that differ from the same request run alone."""
    found = []
    for u, a in enumerate(annotators):
        for r in a.records:
            if r["kind"] == "save" or "error" in r:
                continue
            ref = reference.get((u, r["step"]))
            if ref is None or not np.array_equal(ref, r["label"]):
                differing = None if ref is None else int((ref != r["label"]).sum())
                found.append({"user": u, "step": r["step"], "kind": r["kind"], "voxels_differing": differing})
    return found


def check_saves(server_set: ServerSet, annotators: list[Annotator], studies: Path) -> dict[str, Any]:
    """Each image's last acknowledged save, listed by every server and on disk (saves of one image are
    sequential, so the last acknowledged one, or a later save whose outcome is unknown, must be there)."""
    listings = {
        name: requests.get(f"{s.url}/datastore/?output=all", timeout=120).json()["objects"]
        for name, s in server_set.servers.items()
    }
    lost, checked, detail = 0, 0, []
    for a in annotators:
        saves = [r for r in a.records if r["kind"] == "save"]
        acked = [r["version"] for r in saves if r.get("acknowledged")]
        if not acked or a.label is None:
            continue
        checked += 1
        allowed = {acked[-1], *(r["version"] for r in saves if r.get("unknown_outcome") and r["version"] > acked[-1])}
        listed = {
            name: objects.get(a.image, {}).get("labels", {}).get("final", {}).get("info", {}).get("version")
            for name, objects in listings.items()
        }
        on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(studies / "labels" / "final" / f"{a.image}.nii.gz")))
        whole = any(np.array_equal(on_disk, label_voxels(a.label[1], v)) for v in allowed)
        if not whole or any(v not in allowed for v in listed.values()):
            lost += 1
            detail.append({"image": a.image, "acknowledged": acked[-1], "listed": listed, "voxels_match": whole})
    return {"labels_checked": checked, "labels_lost": lost, "labels_lost_detail": detail[:5]}


def cache_fields(sampler: Sampler, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One server's session cache and admission gate over a run (from the sampled and final ``/info/``)."""
    caches = [s["cache"] for s in sampler.samples if "cache" in s]
    cache_after = after.get("session_cache", {}).get("medsam2", {})
    admission_after = after.get("admission", {})
    evicted_before = before.get("session_cache", {}).get("medsam2", {}).get("evictions", 0)
    return {
        "session_cache": {
            "cap_bytes": cache_after.get("max_bytes"),
            "max_bytes_sampled": max((c["bytes"] for c in caches), default=None),
            "peak_bytes_reported": cache_after.get("peak_bytes"),
            "max_sessions_sampled": max((c["sessions"] for c in caches), default=None),
            "evictions_during_run": cache_after.get("evictions", 0) - evicted_before,
            "samples": len(caches),
        },
        "admission": {k: admission_after.get(k) for k in ("peak_running", "peak_queued", "mean_service_s")},
        "info_latency_s": percentiles([s["info_s"] for s in sampler.samples if "info_s" in s]),
        "healthy_after": bool(after),
    }


def summarize(server_set: ServerSet, users: int, annotators: list[Annotator], seconds: float, reference: dict) -> dict:
    """The run's line: requests, throughput, latency per kind, errors, refusals, mismatches, who served what."""
    records = [r for a in annotators for r in a.records]
    ok = [r for r in records if "error" not in r]
    infer_ok = [r for r in ok if r["kind"] != "save"]
    errors = [r["error"] for r in records if "error" in r]
    found = mismatches(annotators, reference)
    planned = sum(len(a.steps) for a in annotators)

    def by_kind(value: Any, kinds: list[str], rows: list[dict]) -> dict[str, Any]:
        return {k: percentiles([value(r) for r in rows if r["kind"] == k]) for k in kinds}

    return {
        "measurement": "run",
        "replicas": server_set.count if server_set.nginx else None,
        "threads_per_replica": server_set.threads,
        "users": users,
        "requests_planned": planned,
        "requests": len(records),
        "requests_ok": len(ok),
        "requests_not_started": planned - len(records),
        "annotators_unfinished": sum(a.truncated for a in annotators),
        "truncated": any(a.truncated for a in annotators),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(ok) / seconds, 3),
        "latency_s": by_kind(lambda r: r["seconds"], ALL_KINDS, ok),
        "server_total_s": by_kind(lambda r: r["server"].get("total", 0), KINDS, infer_ok),
        "queue_wait_s": by_kind(lambda r: r["server"].get("queue_wait", 0), KINDS, infer_ok),
        "errors": len(errors),
        "error_detail": errors[:5],
        "refused_503": sum(r["refused"] for r in records),
        "compared": len(infer_ok),
        "mismatches": len(found),
        "mismatch_detail": found[:10],
        "sessions_not_reused_after_first_request": sum(r["step"] > 0 and r.get("reused") is False for r in infer_ok),
        "saves_acknowledged": sum(1 for r in ok if r.get("acknowledged")),
        "served_by": served_counts(records),
        "images_on_more_than_one_replica": sum(len(served_counts(a.records)) > 1 for a in annotators),
    }


def summary(results: list[dict[str, Any]], replica_counts: list[int], cap_bytes: int) -> dict[str, Any]:
    """Correctness totals; the throughput of each replica count over the first's at each N (replicas); the
    2D latency target at N = 4 and the session cache against its cap (one server)."""
    by = {(r["users"], r["replicas"]): r for r in results}
    base = replica_counts[0] if replica_counts else None
    line: dict[str, Any] = {"measurement": "summary"}
    line["throughput_rps"] = {f"{c or 1}x{u}": r["throughput_rps"] for (u, c), r in by.items()}
    if len(replica_counts) > 1:
        line["throughput_ratio"] = {
            f"{c}_vs_{base}_at_{u}": round(r["throughput_rps"] / by[(u, base)]["throughput_rps"], 3)
            for (u, c), r in by.items()
            if c != base and by[(u, base)]["throughput_rps"]
        }
    for key in (
        "errors",
        "refused_503",
        "mismatches",
        "compared",
        "requests_not_started",
        "labels_lost",
        "labels_checked",
    ):
        line[key] = sum(r.get(key, 0) for r in results)
    line["images_on_more_than_one_replica"] = sum(r["images_on_more_than_one_replica"] for r in results)
    line["correct"] = all(r["mismatches"] == 0 and r.get("labels_lost", 0) == 0 for r in results)
    if not replica_counts:
        line.update(cache_targets(results, cap_bytes))
    return line


def cache_targets(results: list[dict[str, Any]], cap: int) -> dict[str, Any]:
    """One server: errors and mismatches at the largest N, the 2D p95 at N = 4, the cache's peak against its cap."""
    by_users = {r["users"]: r for r in results}
    top, four = by_users[max(by_users)], by_users.get(4)
    p95_2d = float(four["latency_s"]["2d_encoded"]["p95"]) if four and four["latency_s"]["2d_encoded"]["n"] else None
    peak = max((r["session_cache"]["peak_bytes_reported"] or 0) for r in results)
    return {
        "largest_n": top["users"],
        "zero_errors_at_largest_n": top["errors"] == 0,
        "zero_mismatches_at_largest_n": top["mismatches"] == 0 and top["requests_ok"] > 0,
        "p95_2d_encoded_at_4_s": p95_2d,
        "p95_2d_encoded_at_4_under_1s": None if p95_2d is None else p95_2d < 1.0,
        "cache_cap_bytes": cap,
        "cache_peak_bytes": peak,
        "cache_max_sampled_bytes": max((r["session_cache"]["max_bytes_sampled"] or 0) for r in results),
        "cache_under_cap": bool(peak <= cap),
    }


# ----- the command -----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; the mode's defaults (one server or replicas) and --quick's apply unless given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--replicas",
        default="",
        help="replica counts behind nginx, the first the baseline (e.g. 1,2); " "none: one server asked directly",
    )
    parser.add_argument("--users", help="annotator counts, one run each (per replica count)")
    parser.add_argument("--slices", type=int, help="slices per generated volume")
    parser.add_argument("--size", type=int, default=96, help="rows and columns per generated slice")
    parser.add_argument("--image-size", type=int, default=256, help="model input size (MedSAM2's is 512)")
    parser.add_argument("--think-s", type=float, default=1.0, help="pause between an annotator's requests")
    parser.add_argument("--max-seconds", type=float, help="per run: no new request after this")
    parser.add_argument(
        "--saves",
        action=argparse.BooleanOptionalAction,
        help="two label saves per annotator " "(default: with replicas)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per replica set (default: the cores with " "replicas, torch's own with one server)",
    )
    parser.add_argument("--concurrency", type=int, help="--conf max_concurrent_infers per server (default: app's)")
    parser.add_argument("--max-queued", type=int, help="--conf max_queued_infers per server (default: app's)")
    parser.add_argument("--max-session-gb", type=float, help="cache cap per server (default: 1.5 x the largest N)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of replicas ('': unset)")
    parser.add_argument("--device", help="--conf device for every server (default: the app's)")
    parser.add_argument("--spread-gpus", action="store_true", help="replica i sees only GPU i (mod GPU count)")
    parser.add_argument("--quick", action="store_true", help="N = 2, 6; 6 x 64 x 64; 128 input; 60 s per run")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder (studies, server logs)")
    parser.add_argument("--out", help="append the JSON lines to this file")
    known = parser.parse_known_args(argv)[0]
    parser.set_defaults(**{**(REPLICAS if known.replicas else ONE_SERVER), **(QUICK if known.quick else {})})
    args = parser.parse_args(argv)
    args.user_counts = [int(n) for n in args.users.split(",")]
    args.replica_counts = [int(n) for n in args.replicas.split(",") if n]
    args.saves = bool(args.replica_counts) if args.saves is None else args.saves
    return args


def server_conf(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """``--conf`` of every server: a random-weights checkpoint, the cache cap, the gate's sizes."""
    most = max(args.user_counts)
    conf = {"window": "abdomen", "max_sessions": str(4 * most + 8), **random_checkpoint_conf(work, args.image_size)}
    if args.replica_counts:  # one fine-tuned path for every replica (none is there: all serve the checkpoint above)
        conf["finetuned_checkpoint"] = str(work / "shared_model" / "finetuned.pt")
    estimate = session_bytes_estimate(args.slices, args.size, args.image_size)
    conf["max_session_gb"] = str(args.max_session_gb or round(1.5 * most * estimate / (1 << 30), 4))
    for key, value in (("max_concurrent_infers", args.concurrency), ("max_queued_infers", args.max_queued)):
        if value is not None:
            conf[key] = str(value)
    if args.device:
        conf["device"] = args.device
    return conf


def start_sets(args: argparse.Namespace, studies: Path, conf: dict[str, str], work: Path, sets: dict) -> None:
    """Into ``sets``: the replica sets, one after the other (parallel starts would fight over the cores), or the
    one server (key 0). What started is in ``sets`` even when a later start fails, for the caller to stop."""
    if not args.replica_counts:
        sets[0] = ServerSet(1, studies, conf, work, nginx=False, threads=args.threads)
        return
    nginx_binary()
    total = args.threads or machine()["cores"]
    env = {"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}
    gpus = torch.cuda.device_count() if args.spread_gpus else 0
    for count in args.replica_counts:
        threads = max(1, total // count)
        sets[count] = ServerSet(count, studies, conf, work, nginx=True, threads=threads, gpus=gpus, env=env)


def setup_line(args: argparse.Namespace, sets: dict[int, ServerSet], scripts: list[dict], conf: dict, order) -> dict:
    """What ran: the machine, model, volumes, servers and their settings, the run order."""
    first = next(iter(sets.values()))
    line = {
        "measurement": "setup",
        **machine(),
        "model": f"hiera-t {args.image_size} (MedSAM2 shape, random weights)",
        "volume_kji": [args.slices, args.size, args.size],
        "users": args.user_counts,
        "replicas": args.replica_counts or None,
        "threads_per_replica": {str(c): s.threads for c, s in sets.items()},
        "run_order": [f"{c or 1}x{u}" for u, c in order],
        "requests_per_annotator": len(scripts[0]["steps"]),
        "kinds": [kind for kind, *_ in scripts[0]["steps"]],
        "think_s": args.think_s,
        "max_seconds_per_run": args.max_seconds,
        "conf": {k: v for k, v in conf.items() if k not in ("checkpoint", "model_config", "finetuned_checkpoint")},
        "admission": first.info().get("admission"),
        "session_bytes_estimate": session_bytes_estimate(args.slices, args.size, args.image_size),
    }
    if args.replica_counts:
        line["nginx"] = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip()
        line["replica_env"] = {"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}
    return line


def run_order(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(users, replica count) per run: counts in order at the first N, reversed at the next (ABBA)."""
    counts = args.replica_counts or [0]
    return [(u, c) for i, u in enumerate(args.user_counts) for c in (counts if i % 2 == 0 else counts[::-1])]


def measure(args, sets, scripts, labels, studies, cap_bytes: int, emit) -> None:
    """Warm-up, the references, every run, the summary."""
    order = run_order(args)
    warm_up(sets, scripts, labels)
    reference, line = references(sets[order[0][1]], scripts, labels)
    emit(line)
    results = []
    for index, (users, count) in enumerate(order, start=1):
        server_set = sets[count]
        before, load_before = server_set.info(), loadavg()
        with Sampler(server_set, info=not server_set.nginx) as sampler:
            name = f"x{count}-n{users}" if server_set.nginx else f"n{users}"
            annotators, seconds = run_annotators(server_set.url, scripts, users, name, args, labels, 1000 * index)
        line = summarize(server_set, users, annotators, seconds, reference)
        if args.saves:
            line.update(check_saves(server_set, annotators, studies))
        if not server_set.nginx:
            line.update(cache_fields(sampler, before, server_set.info()))
        line["server_rss_max_gib"] = {k: round(v / (1 << 30), 3) for k, v in sampler.peak.items()}
        line["loadavg_1m"] = [load_before, loadavg()]  # before, after
        results.append(emit(line))
    emit(summary(results, args.replica_counts, cap_bytes))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    emit = JsonLines(args.out, bench="load", mode="replicas" if args.replica_counts else "one server").emit
    work = Path(tempfile.mkdtemp(prefix="medsam2_load_"))
    studies = work / "studies"
    scripts = make_studies(studies, max(args.user_counts), args.slices, args.size)
    labels = add_saves(scripts, studies) if args.saves else {}
    conf = server_conf(args, work)
    t_start = time.monotonic()
    sets: dict[int, ServerSet] = {}
    try:
        start_sets(args, studies, conf, work, sets)
        emit(
            {**setup_line(args, sets, scripts, conf, run_order(args)), "start_s": round(time.monotonic() - t_start, 1)}
        )
        cap_bytes = int(float(conf["max_session_gb"]) * (1 << 30))
        measure(args, sets, scripts, labels, studies, cap_bytes, emit)
    finally:
        for server_set in sets.values():
            server_set.stop()
        if args.keep_work:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
