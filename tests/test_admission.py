"""Admission control: the gate's limits, order and timeouts; a flooded real server answers 503 with Retry-After
to what it cannot take, serves the rest, and keeps answering /info meanwhile."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests
import torch

from conftest import start_server, stop_server, write_image
from lib.engine.checkpoints import build_model, save_checkpoint
from lib.errors import ServerBusy
from lib.server.admission import AdmissionGate, AdmissionSettings
from lib.settings import parse_settings
from sam2_testing import blob_volume, object_present_bias, small_config_file


def from_conf(conf: dict[str, str], device_type: str = "cuda") -> AdmissionSettings:
    return AdmissionSettings.from_settings(parse_settings(conf, cuda_available=device_type == "cuda"))


def test_settings_from_conf():
    assert from_conf({}) == AdmissionSettings(1, 32, 120.0)  # a GPU: one at a time
    assert from_conf({}, "cpu") == AdmissionSettings(4, 32, 120.0)
    assert from_conf({"max_concurrent_infers": "1"}, "cpu").max_concurrent == 1
    conf = {"max_concurrent_infers": "2", "max_queued_infers": "0", "queue_timeout_s": "2.5"}
    assert from_conf(conf) == AdmissionSettings(2, 0, 2.5)


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_concurrent_infers", "0"),
        ("max_concurrent_infers", "1.5"),
        ("max_queued_infers", "-1"),
        ("max_queued_infers", "many"),
        ("queue_timeout_s", "0"),
        ("queue_timeout_s", "nan"),
        ("queue_timeout_s", "inf"),
    ],
)
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        from_conf({key: value})


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_full_queue_is_refused_at_once_with_a_retry_hint_from_the_observed_pace():
    clock = FakeClock()
    gate = AdmissionGate(AdmissionSettings(max_concurrent=1, max_queued=0), clock=clock)
    with gate.admit() as waited:
        assert waited == 0
        clock.now += 10.0  # one request that took 10 s
    with gate.admit():
        with pytest.raises(ServerBusy, match="max_queued_infers 0") as busy:
            with gate.admit():
                pass
    assert busy.value.retry_after_s == 10  # one request ahead, 10 s each, one slot
    snap = gate.snapshot()
    assert snap["admitted"] == 2 and snap["refused_queue_full"] == 1 and snap["running"] == 0
    assert snap["mean_service_s"] == pytest.approx(8.0)  # 0.8 * 10 + 0.2 * 0


def _hold(gate: AdmissionGate, release: threading.Event, log: list, name: str) -> None:
    try:
        with gate.admit():
            log.append(name)
            release.wait(10)
    except ServerBusy:
        log.append(f"busy:{name}")


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_waiters_are_admitted_in_arrival_order_and_never_above_the_limit():
    gate = AdmissionGate(AdmissionSettings(max_concurrent=2, max_queued=4))
    releases = [threading.Event() for _ in range(6)]
    log: list[str] = []
    threads = []
    for n in range(6):
        t = threading.Thread(target=_hold, args=(gate, releases[n], log, str(n)))
        t.start()
        threads.append(t)
        # 0 and 1 run, the others queue; wait for each to take its place before the next arrives
        _wait_until(lambda n=n: gate.snapshot()["running"] + gate.snapshot()["queued"] == n + 1)
    assert log == ["0", "1"] and gate.snapshot()["queued"] == 4
    for admitted, n in enumerate((1, 0, 2, 3), start=3):  # slots freed out of order: the queue drains oldest first
        releases[n].set()
        _wait_until(lambda admitted=admitted: len(log) == admitted)
    releases[4].set()
    releases[5].set()
    for t in threads:
        t.join(10)
    assert log == ["0", "1", "2", "3", "4", "5"]
    snap = gate.snapshot()
    assert snap["peak_running"] == 2 and snap["peak_queued"] == 4 and snap["running"] == snap["queued"] == 0


def test_a_waiter_is_refused_after_the_queue_timeout_and_frees_its_place():
    gate = AdmissionGate(AdmissionSettings(max_concurrent=1, max_queued=1, queue_timeout_s=0.2))
    release = threading.Event()
    log: list[str] = []
    holder = threading.Thread(target=_hold, args=(gate, release, log, "holder"))
    holder.start()
    _wait_until(lambda: gate.snapshot()["running"] == 1)
    t0 = time.monotonic()
    with pytest.raises(ServerBusy, match="queue_timeout_s") as busy:
        with gate.admit():
            pass
    assert 0.2 <= time.monotonic() - t0 < 2.0 and busy.value.retry_after_s >= 1
    assert gate.snapshot()["queued"] == 0 and gate.snapshot()["refused_timeout"] == 1
    release.set()
    holder.join(10)
    with gate.admit():  # the place is free again
        assert gate.snapshot()["running"] == 1


def test_an_error_inside_releases_the_slot():
    gate = AdmissionGate(AdmissionSettings(max_concurrent=1, max_queued=0))
    with pytest.raises(RuntimeError):
        with gate.admit():
            raise RuntimeError("model failed")
    with gate.admit():
        pass
    assert gate.snapshot()["admitted"] == 2 and gate.snapshot()["running"] == 0


def test_default_server_reports_its_limits_and_cache(server):
    info = server.get("/info/").json()
    assert info["admission"]["max_concurrent_infers"] == 4 and info["admission"]["max_queued_infers"] == 32
    cache = info["session_cache"]["medsam2"]
    assert cache["max_bytes"] == 6 << 30 and cache["max_sessions"] == 4 and cache["bytes"] <= cache["max_bytes"]


def test_flooded_server_refuses_with_retry_after_serves_the_rest_and_stays_healthy(tmp_path):
    config = small_config_file(tmp_path, 128)
    torch.manual_seed(0)
    ckpt = tmp_path / "random_128.pt"
    save_checkpoint(object_present_bias(build_model(config)), ckpt)
    studies = tmp_path / "studies"
    studies.mkdir()
    geometry = dict(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(blob_volume((16, 48, 48), radius=10.0), studies / "vol.nii.gz", **geometry)
    conf = {"checkpoint": str(ckpt), "model_config": str(config), "window": "abdomen"}
    conf.update(max_concurrent_infers="1", max_queued_infers="1", max_sessions="16")
    server = start_server(studies, conf, tmp_path / "server.log")
    try:
        flood = 10
        barrier = threading.Barrier(flood)
        answers: list[requests.Response | Exception] = [None] * flood  # type: ignore[list-item]

        def annotate(n: int) -> None:
            # each its own session: every request encodes all 16 slices, so requests overlap
            params = {"prompts": [{"label": "lesion", "slice": 8, "box": [12, 12, 36, 36]}], "client_id": f"u{n}"}
            barrier.wait()
            try:
                answers[n] = server.post("/infer/medsam2_3d?image=vol&output=json", data={"params": json.dumps(params)})
            except requests.RequestException as e:
                answers[n] = e

        snapshots: list[dict] = []
        info_seconds: list[float] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                snapshots.append(server.get("/info/", timeout=30).json()["admission"])
                info_seconds.append(time.monotonic() - t0)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        users = [threading.Thread(target=annotate, args=(n,)) for n in range(flood)]
        for t in users:
            t.start()
        for t in users:
            t.join(300)
        done.set()
        watcher.join(60)

        assert all(isinstance(a, requests.Response) for a in answers), answers  # nothing timed out
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503}, [a.text for a in answers if a.status_code not in (200, 503)]
        served = [a.json() for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code == 503]
        assert len(served) >= 2 and len(refused) >= 1, codes  # one ran, one queued, the rest refused
        for r in refused:
            assert int(r.headers["Retry-After"]) >= 1
            assert "max_queued_infers 1" in r.json()["detail"]
        assert all(s["coverage"]["lesion"]["num_slices_propagated"] == 16 for s in served)
        assert max(s["latencies"]["queue_wait"] for s in served) > 0  # someone waited in the queue
        # /info answered while inferences ran (MONAI Label alone would block it until each one finished)
        assert any(s["running"] == 1 for s in snapshots) and np.median(info_seconds) < 1.0
        final = server.get("/info/").json()["admission"]
        assert final["peak_running"] == 1 and final["peak_queued"] == 1
        assert final["refused_queue_full"] == len(refused) and final["admitted"] == len(served)
        assert final["running"] == final["queued"] == 0
        # healthy afterwards: a new request is served
        params = {"prompts": [{"label": "lesion", "slice": 8, "box": [12, 12, 36, 36]}], "client_id": "after"}
        r = server.post("/infer/medsam2_2d?image=vol&output=json", data={"params": json.dumps(params)})
        assert r.status_code == 200, r.text
        assert server.proc.poll() is None
    finally:
        stop_server(server)
