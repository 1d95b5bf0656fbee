"""Two real server replicas behind a real nginx, run by the documented launcher (scripts/replicas.py, which renders
deploy/nginx/medsam2-replicas.conf and supervises) on one shared studies folder and one shared model folder: an
image keeps meeting its replica, labels saved on either are seen by both, one training run at a time for both and
its checkpoint reaches both, the operations endpoints answer, a SIGKILL of one replica while annotators work loses
no acknowledged label (failures: only requests in flight at the kill, each a 502 from nginx saying what to do) and
the launcher starts the killed replica again, and SIGTERM stops everything.

The tests of this module share one launcher and run in file order: the last two kill a replica, then the launcher.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from pacs_testing import require
from test_crash_safety import GEOMETRY, PUBLISHING_RUN, label_array, publishing_setup
from test_server_2d import split_multipart

from conftest import Server, write_image
from sam2_testing import APP_DIR

sys.path.insert(0, str(APP_DIR.parents[1] / "scripts"))
from local_orthanc import free_port  # noqa: E402
from replicas import nginx_binary  # noqa: E402

pytestmark = pytest.mark.server  # the launcher starts `monailabel start_server` twice
IMAGES = [f"case{i}" for i in range(6)]
LABELLED = IMAGES[:4]
BOX_3D = {"prompts": [{"label": "lesion", "slice": 6, "box": [14, 14, 34, 34]}]}
BOX_2D = {"prompts": [{"label": "lesion", "slice": 5, "box": [14, 14, 34, 34]}]}
NAMES = ("replica-1", "replica-2")  # the launcher's names


@dataclass
class ReplicaSet:
    url: str  # nginx
    replicas: dict[str, Server]
    launcher: subprocess.Popen
    output: list[str]  # the launcher's lines so far
    studies: Path
    published: Path
    run_dir: Path
    started_in_s: float  # the launcher's first start of both replicas, until ready (the machine's pace now)

    def pid(self, name: str) -> int:
        """The replica's current process id (the launcher writes it at every start)."""
        return int((self.run_dir / f"{name}.pid").read_text())


def two_free_ports() -> int:
    """A port that is free, and the next one too (the launcher's replicas listen on consecutive ports)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def collect_lines(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line)


@pytest.fixture(scope="module")
def replica_set(tmp_path_factory):
    require([nginx_binary()], "nginx (Debian nginx)")
    root = tmp_path_factory.mktemp("replicas")
    studies, conf, published = publishing_setup(root, images=len(IMAGES), labelled=len(LABELLED))
    conf |= {"max_sessions": "8", "cpu_encoder": "torch", "warm_up": "off"}
    port, first, run_dir = free_port(), two_free_ports(), root / "run"
    cmd = [sys.executable, str(APP_DIR.parents[1] / "scripts" / "replicas.py"), "--replicas", "2"]
    cmd += ["--port", str(port), "--replica-port", str(first), "--studies", str(studies)]
    cmd += ["--run-dir", str(run_dir), "--", *(x for k, v in conf.items() for x in ("--conf", k, v))]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    threading.Thread(target=collect_lines, args=(launcher.stdout, output), daemon=True).start()
    started, deadline = time.time(), time.time() + 300
    while not any("2 replicas behind" in line for line in output):
        assert launcher.poll() is None and time.time() < deadline, "".join(output)
        time.sleep(0.5)
    replicas = {
        name: Server(f"http://127.0.0.1:{first + i}", launcher, run_dir / f"{name}.log") for i, name in enumerate(NAMES)
    }
    url = f"http://127.0.0.1:{port}"
    rs = ReplicaSet(url, replicas, launcher, output, studies, published, run_dir, time.time() - started)
    yield rs
    if launcher.poll() is None:
        launcher.terminate()
        launcher.wait(timeout=90)


def infer(url: str, image: str, params: dict, model: str = "medsam2_3d", **kw) -> requests.Response:
    return requests.post(
        f"{url}/infer/{model}",
        params={"image": image, "output": "all"},
        data={"params": json.dumps(params)},
        timeout=300,
        **kw,
    )


def answer_of(response: requests.Response) -> tuple[np.ndarray | None, dict]:
    """(label voxels, result JSON) of an output=all answer."""
    label, result = split_multipart(response)
    return (None if label is None else sitk.GetArrayFromImage(label)), result or {}


def save_label(url: str, image: str, version: int, folder: Path) -> requests.Response:
    path = folder / f"{image}_v{version}_{threading.get_ident()}.nii.gz"
    write_image(label_array(image, version), path, **GEOMETRY)
    try:
        return requests.put(
            f"{url}/datastore/label",
            params={"image": image, "tag": "final"},
            files={"label": (f"{image}.nii.gz", path.read_bytes())},
            data={"params": json.dumps({"version": version})},
            timeout=120,
        )
    finally:
        path.unlink()


def _served_by(url: str, image: str) -> str:
    """The replica nginx sends requests about ``image`` to."""
    return requests.get(f"{url}/datastore/image/info", params={"image": image}, timeout=30).headers["x-served-by"]


def test_an_image_keeps_meeting_its_replica(replica_set):
    # which replica answers: the consistent hash of the image id (existing or not), the same every time
    served_by = {}
    for i in range(40):
        image = f"no_such_image_{i}"
        answers = {
            requests.get(f"{replica_set.url}/datastore/image/info", params={"image": image}, timeout=30)
            for _ in range(2)
        }
        replicas = {r.headers["x-served-by"] for r in answers}
        assert len(replicas) == 1, (image, replicas)
        served_by[image] = replicas.pop()
    assert set(served_by.values()) == set(NAMES), "the images did not spread over both replicas"
    # a 3D session stays on its replica: the follow-up reuses the encoded slices
    first = infer(replica_set.url, "case4", {**BOX_3D, "client_id": "affinity"})
    moved = {"prompts": [{"label": "lesion", "slice": 6, "box": [15, 15, 33, 33]}]}
    again = infer(replica_set.url, "case4", {**moved, "client_id": "affinity"})
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.headers["x-served-by"] == again.headers["x-served-by"]
    assert answer_of(again)[1]["session"]["reused"] is True


def test_labels_saved_on_either_replica_are_seen_by_both(replica_set, tmp_path):
    results: list[tuple[str, int, int]] = []

    def saver(name: str, image: str) -> None:
        for version in range(1, 9):
            r = save_label(replica_set.replicas[name].url, image, version, tmp_path)
            results.append((image, version, r.status_code))

    threads = [
        threading.Thread(target=saver, args=(n, img))
        for n, img in zip(NAMES * 2, ("case4", "case5", "case0", "case1"), strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(code == 200 for *_, code in results), results
    for name, server in replica_set.replicas.items():
        objects = server.get("/datastore/?output=all").json()["objects"]
        for image in ("case4", "case5", "case0", "case1"):
            info = objects[image]["labels"]["final"]["info"]
            assert info["version"] == 8, (name, image, info)
    index = json.loads((replica_set.studies / "datastore_v2.json").read_text())
    assert {i for i, o in index["objects"].items() if "final" in o["labels"]} >= {"case0", "case1", "case4", "case5"}


def test_metrics_health_and_request_ids(replica_set):
    rid = "viewer-req-0123456789"
    r = infer(replica_set.url, "case2", {**BOX_3D, "client_id": "metrics"}, headers={"X-Request-ID": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    server = replica_set.replicas[r.headers["x-served-by"]]
    metrics = server.get("/metrics").text
    assert 'medsam2_requests_total{method="POST",route="/infer/{model}",status="200",task="medsam2_3d"}' in metrics
    assert 'medsam2_request_seconds_bucket{le="+Inf",route="/infer/{model}",status="200",task="medsam2_3d"}' in metrics
    for name in (
        "medsam2_ready 1.0",
        "medsam2_session_cache_bytes",
        "medsam2_infer_queued",
        "medsam2_training_running",
    ):
        assert name in metrics, name
    assert 'medsam2_checkpoint_info{licence="unknown",model="medsam2"' in metrics  # a file given by path
    assert server.get("/health/live").json()["status"] == "alive"
    assert server.get("/health/ready").json() == {"status": "ready", "replica": r.headers["x-served-by"]}
    lines = [json.loads(x.split(" - ", 1)[1]) for x in server.log.read_text().splitlines() if '"event": "request"' in x]
    mine = [x for x in lines if x["request_id"] == rid]
    assert mine and mine[0]["route"] == "/infer/{model}" and mine[0]["status"] == 200, mine
    inner = [x for x in server.log.read_text().splitlines() if f"[req={rid}]" in x and '"event": "request"' not in x]
    assert inner, "the inference thread's own log lines carry the request id"
    info = server.get("/info/").json()
    assert info["replica"] == r.headers["x-served-by"] and info["checkpoints"]["medsam2"]["licence"] == "unknown"


def _train_done(server: Server, timeout_s: float) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = server.get("/train/").json()
        if status.get("status") in ("DONE", "ERROR"):
            return status
        time.sleep(1)
    raise AssertionError(f"training on {server.url} did not end within {timeout_s} s")


def test_one_training_run_for_all_replicas_and_its_checkpoint_reaches_both(replica_set):
    before = replica_set.published.stat().st_mtime_ns
    servers = replica_set.replicas
    with ThreadPoolExecutor(2) as pool:  # both asked at once
        asked = {name: pool.submit(s.post, "/train/medsam2", json=PUBLISHING_RUN) for name, s in servers.items()}
        answers = {name: future.result() for name, future in asked.items()}
    assert sorted(r.status_code for r in answers.values()) == [200, 409], {n: r.text for n, r in answers.items()}
    winner = next(n for n, r in answers.items() if r.status_code == 200)
    trainer, other = servers[winner], servers[(set(NAMES) - {winner}).pop()]
    refused = next(r for r in answers.values() if r.status_code == 409)
    assert f"replica '{winner}'" in refused.json()["detail"], refused.text
    assert "medsam2_training_running 1.0" in other.get("/metrics").text
    assert other.get("/info/").json()["training_lock"]["held_by"].startswith(f"model 'medsam2' on replica '{winner}'")
    assert _train_done(trainer, 300)["status"] == "DONE"
    assert replica_set.published.stat().st_mtime_ns != before, "the run did not publish"
    # both replicas serve the new weights without a restart: the same request gives the same voxels (on an image
    # no annotator of the failover test uses: a session there would make its moved session look reused)
    masks = [answer_of(infer(s.url, "case5", {**BOX_3D, "client_id": "after-train"}))[0] for s in (trainer, other)]
    assert np.array_equal(masks[0], masks[1])
    assert 'medsam2_checkpoint_loads{model="medsam2"} 2.0' in other.get("/metrics").text
    # the lock was released: the other replica may train now
    deadline = time.time() + 30
    while (r := other.post("/train/medsam2", json={**PUBLISHING_RUN, "steps_per_epoch": 1})).status_code == 409:
        assert time.time() < deadline, r.text
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert _train_done(other, 300)["status"] == "DONE"


@dataclass
class Ledger:
    acked: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, set[int]] = field(default_factory=dict)
    served: int = 0
    failed: list[tuple[float, int, str]] = field(default_factory=list)
    served_after_kill: dict[str, int] = field(default_factory=dict)
    moved_session_reused: dict[str, bool] = field(default_factory=dict)  # its first answer on another replica
    lock: threading.Lock = field(default_factory=threading.Lock)


def _annotator(
    url: str, image: str, victim: str, ledger: Ledger, stop: threading.Event, killed_at: list[float], folder: Path
):
    version = 100 * (IMAGES.index(image) + 1)
    step = 0
    while not stop.is_set():
        step += 1
        kind = ("3d", "save", "2d")[step % 3]
        t0 = time.time()
        try:
            if kind == "save":
                version += 1
                with ledger.lock:
                    ledger.in_flight.setdefault(image, set()).add(version)
                r = save_label(url, image, version, folder)
            elif kind == "3d":
                r = infer(url, image, {**BOX_3D, "client_id": image})
            else:
                r = infer(url, image, {**BOX_2D, "client_id": image}, model="medsam2_2d")
        except requests.RequestException as e:
            with ledger.lock:
                ledger.failed.append((t0, 0, type(e).__name__))
            continue
        with ledger.lock:
            if r.status_code != 200:
                ledger.failed.append((t0, r.status_code, r.text[:300]))
                continue
            ledger.served += 1
            if kind == "save":
                ledger.acked[image] = version
                ledger.in_flight[image].discard(version)
            if killed_at and t0 > killed_at[0]:
                ledger.served_after_kill[image] = ledger.served_after_kill.get(image, 0) + 1
            # before the kill an image's requests all go to its home replica, so an answer from another one came
            # after the signal, whatever its send time (a request sent just before it can still meet a dead victim
            # and be passed on): the first such answer must say that the session started over
            if kind != "save" and image not in ledger.moved_session_reused and r.headers["x-served-by"] != victim:
                ledger.moved_session_reused[image] = answer_of(r)[1]["session"]["reused"]


def test_sigkill_of_a_replica_while_annotators_work_loses_no_label(replica_set, tmp_path):
    ledger, stop, killed_at = Ledger(), threading.Event(), []
    images = IMAGES[:4]
    home = {i: _served_by(replica_set.url, i) for i in images}
    victim = home[images[0]]  # a replica that holds at least one annotator's session
    moved = {i for i in images if home[i] == victim}
    survivor = replica_set.replicas[(set(NAMES) - {victim}).pop()]
    victim_pid = replica_set.pid(victim)
    args = (victim, ledger, stop, killed_at, tmp_path)
    threads = [threading.Thread(target=_annotator, args=(replica_set.url, img, *args)) for img in images]
    for t in threads:
        t.start()
    time.sleep(8)
    # the time is taken BEFORE the signal: a request sent after the signal counts as sent after the kill (taken
    # after it, requests sent in between were counted as before the kill, although the survivor served them)
    killed_at.append(time.time())
    os.killpg(victim_pid, signal.SIGKILL)  # the replica and any process it started, as the OOM killer might
    time.sleep(12)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    report = {"served": ledger.served, "failed": len(ledger.failed), "acknowledged_labels": len(ledger.acked)}
    report["sessions_moved"] = len(moved)
    # every failure is a request in flight at the kill, answered by nginx with its JSON 502
    # (or sent in the moment nginx takes to see the replica's connections close)
    failures = [(round(t0 - killed_at[0], 2), code, text) for t0, code, text in ledger.failed]
    for since_kill, code, text in failures:
        assert since_kill <= 2.0 and code == 502 and "replica" in json.loads(text)["detail"], failures
    assert len(failures) <= len(images), failures
    assert set(ledger.served_after_kill) == set(images), ledger.served_after_kill  # everyone goes on working
    # the sessions of the killed replica start over on the survivor, and its answers say so
    assert moved and {ledger.moved_session_reused.get(i) for i in moved} == {False}, (home, ledger.moved_session_reused)
    # every acknowledged label is in the datastore, whole, as acknowledged (or as the save in flight at the kill)
    objects = survivor.get("/datastore/?output=all").json()["objects"]
    lost = 0
    for image, version in ledger.acked.items():
        allowed = {version, *ledger.in_flight.get(image, set())}
        saved = sitk.GetArrayFromImage(
            sitk.ReadImage(str(replica_set.studies / "labels" / "final" / f"{image}.nii.gz"))
        )
        listed = objects[image]["labels"]["final"]["info"].get("version")
        lost += not (listed in allowed and any(np.array_equal(saved, label_array(image, v)) for v in allowed))
    report["labels_lost"] = lost
    # the launcher starts the killed replica again (after 1 s), ready within a minute of the kill: a server start
    # takes 10-30 s on 2 idle cores; on a machine loaded so that the first start took longer (the fixture's), the
    # bound grows with it: what the launcher adds is the back-off, checked below
    restarted, limit_s = replica_set.replicas[victim], max(60.0, 1.5 * replica_set.started_in_s)
    while not _ready(restarted.url):
        assert time.time() - killed_at[0] < limit_s, "".join(replica_set.output) + restarted.log.read_text()[-3000:]
        time.sleep(0.5)
    report["replica_back_after_s"] = round(time.time() - killed_at[0], 1)
    report["first_start_s"] = round(replica_set.started_in_s, 1)
    print("FAILOVER " + json.dumps(report))
    (APP_DIR.parents[1] / "test-artifacts").mkdir(exist_ok=True)
    (APP_DIR.parents[1] / "test-artifacts" / "failover.json").write_text(json.dumps(report))
    assert lost == 0 and ledger.acked, report
    said = "".join(replica_set.output)
    assert f"{victim} (pid {victim_pid}) exited with status -9: restarting it in 1 s" in said, said
    assert replica_set.pid(victim) != victim_pid and f"{victim} restarted (pid {replica_set.pid(victim)}" in said
    # a save in flight at the kill may leave its temporary file, never listed or served: the restarted replica
    # removed it when it started
    assert not sorted(replica_set.studies.rglob("*.part"))
    # and nginx sends the killed replica's images to it again (once its fail_timeout of 10 s has passed)
    deadline = time.time() + 30
    while _served_by(replica_set.url, images[0]) != victim:
        assert time.time() < deadline, "nginx did not send requests to the restarted replica again"
        time.sleep(1)
    assert infer(replica_set.url, images[0], {**BOX_3D, "client_id": "after-restart"}).status_code == 200


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/health/ready", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_sigterm_stops_the_launcher_nginx_and_every_replica(replica_set):
    """Ctrl+C or ``systemctl stop``: the launcher stops its children and exits 0; nothing keeps listening."""
    pids = [replica_set.pid(name) for name in NAMES]
    replica_set.launcher.terminate()
    assert replica_set.launcher.wait(timeout=90) == 0, "".join(replica_set.output)
    for url in (replica_set.url, *(s.url for s in replica_set.replicas.values())):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health/live", timeout=5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
