"""``--conf auto_train_after N``: the N-th final label saved since the last training start starts training,
never a second run while one is under way; checked on its own and through the real server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests
import torch
from test_training import learnable_volume

from conftest import start_server, stop_server, write_image
from lib.engine.checkpoints import build_model, save_checkpoint
from lib.server.auto_train import AutoTrain
from sam2_testing import small_config_file


class _Runs:
    """Stands in for MONAI Label's training task list."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.running = False
        self.clock = 1000.0

    def now(self) -> float:
        self.clock += 1.0
        return self.clock

    def last_start(self) -> float | None:
        return self.started[-1] if self.started else None

    def start(self) -> bool:
        self.started.append(self.clock)
        self.running = True
        return True

    def save(self, auto: AutoTrain, final: bool = True) -> bool:
        return auto.label_saved(final, lambda: self.running, self.last_start, self.start)


def test_counts_final_labels_since_the_last_start_and_never_starts_a_second_run():
    runs = _Runs()
    auto = AutoTrain(2, clock=runs.now)
    assert auto.enabled
    assert not runs.save(auto) and auto.pending() == 1
    assert not runs.save(auto, final=False) and auto.pending() == 1  # another tag does not count
    assert runs.save(auto) and len(runs.started) == 1 and auto.pending() == 0
    # while it runs: labels count towards the next run, which does not start yet
    assert not runs.save(auto) and not runs.save(auto) and not runs.save(auto)
    assert len(runs.started) == 1 and auto.pending() == 3
    runs.running = False  # the run ended: the next final label starts the next one
    assert runs.save(auto) and len(runs.started) == 2 and auto.pending() == 0
    runs.running = False
    # a run started by someone else (POST /train) restarts the count
    assert not runs.save(auto)
    runs.started.append(runs.now())
    assert auto.pending(runs.last_start()) == 0 and not runs.save(auto) and len(runs.started) == 3


def test_off_by_default_and_concurrent_saves_start_one_run():
    runs = _Runs()
    off = AutoTrain(0)
    assert not off.enabled and not any(runs.save(off) for _ in range(5)) and not runs.started
    with pytest.raises(ValueError):
        AutoTrain(-1)
    auto = AutoTrain(3)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(runs.save(auto))) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and len(runs.started) == 1


def _train_tasks(server) -> list[dict]:
    r = server.get("/train/?all=true")
    return r.json() if r.status_code == 200 else []


def test_server_starts_training_after_n_final_labels(tmp_path):
    config = small_config_file(tmp_path)
    torch.manual_seed(0)
    ckpt = tmp_path / "random_small.pt"
    save_checkpoint(build_model(config), ckpt)
    studies = tmp_path / "studies"
    studies.mkdir()
    labels = tmp_path / "labels"
    labels.mkdir()
    geometry = dict(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    for seed in range(3):
        frames, label = learnable_volume(seed, shape=(12, 48, 48))
        write_image(frames.astype(np.int16), studies / f"case{seed}.nii.gz", **geometry)
        write_image(label, labels / f"case{seed}.nii.gz", **geometry)
    conf = {"checkpoint": str(ckpt), "model_config": str(config), "window": "128,256", "auto_train_after": "2"}
    conf.update(epochs="1", steps_per_epoch="1", clip_length="2", max_objects="1")
    server = start_server(studies, conf, tmp_path / "server.log")

    def save(case: int, tag: str = "final") -> dict:
        with open(labels / f"case{case}.nii.gz", "rb") as f:
            r = requests.put(
                f"{server.url}/datastore/label",
                params={"image": f"case{case}", "tag": tag},
                files={"label": (f"case{case}.nii.gz", f)},
                timeout=60,
            )
        assert r.status_code == 200, r.text
        return r.json()

    try:
        assert server.get("/info/").json()["auto_train"] == {"after": 2, "final_labels_since_last_training": 0}
        assert save(0)["auto_train"] == {"started": False, "pending": 1}
        assert save(1, tag="original")["auto_train"] == {"started": False, "pending": 1}  # not a final label
        assert _train_tasks(server) == []  # one final label: no training
        assert save(1)["auto_train"]["started"] is True  # the second final label starts it
        assert len(_train_tasks(server)) == 1
        # while it runs, two more final labels reach the threshold again: no second run
        assert save(2)["auto_train"] == {"started": False, "pending": 1}
        assert save(0)["auto_train"] == {"started": False, "pending": 2}
        (task,) = _train_tasks(server)
        assert task["status"] in ("SUBMITTED", "RUNNING"), task  # (the premise: it was still under way)
        deadline = time.time() + 600
        while time.time() < deadline and _train_tasks(server)[-1]["status"] in ("SUBMITTED", "RUNNING"):
            time.sleep(2)
        tasks = _train_tasks(server)
        assert len(tasks) == 1 and tasks[0]["status"] == "DONE", (tasks, server.log.read_text()[-3000:])
        assert tasks[0]["request"]["model"] == "medsam2"
        info = server.get("/info/").json()
        stats = info["train_stats"]["medsam2"]
        assert stats["status"] == "DONE" and stats["settings"]["epochs"] == 1 and len(stats["epochs"]) == 1
        assert stats["settings"]["steps_per_epoch"] == 1 and stats["settings"]["clip_length"] == 2  # from --conf
        assert info["auto_train"]["final_labels_since_last_training"] == 2
    finally:
        stop_server(server)
