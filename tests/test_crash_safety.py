"""Crash safety with real processes: the server (and its training subprocess) is SIGKILLed in the middle of a
label save, a training epoch and a checkpoint publish, and at a random moment of a stream of label saves; after
each restart on the same studies folder every acknowledged label (HTTP 200 to PUT /datastore/label) is intact,
the served checkpoint loads, and training runs again.

The exact windows are hit with the app's test hook ``MEDSAM2_TEST_PAUSE_AT`` (lib/atomic_files.py): the server
writes a marker file and sleeps at the named point, and the test kills it there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from test_training import learnable_volume

from conftest import Server, kill_server, start_server, stop_server, write_image
from lib.atomic_files import PAUSE_AT_ENV, PAUSE_MARKER_ENV, atomic_write, remove_stale_temp_files
from lib.engine.checkpoints import build_model, save_checkpoint
from sam2_testing import small_config_file

GEOMETRY = dict(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
LABELLED = [f"case{i}" for i in range(4)]  # final labels from the start (the training data); case4 has none
TAGS = ["final", "reviewed"]
SHAPE = (12, 48, 48)
# from the served checkpoint (validation Dice 0, see `setup`) these settings reach Dice > 0: the run publishes
PUBLISHING_RUN = {"epochs": 1, "steps_per_epoch": 2, "clip_length": 3, "max_objects": 2, "lr": 3e-3}
PUBLISHING_RUN |= {"grad_clip": 1.0, "p_box": 1.0, "p_cross_end": 0.0}
# a run of two steps from a model that answers "no object" everywhere also raises the overlap with objects that
# were not prompted (0 -> 0.2): the prompt-following guard is tested in test_prompt_following.py, not here
PUBLISHING_RUN |= {"publish_max_overlap_rise": 1.0}


def label_array(image: str, version: int) -> np.ndarray:
    """The image's true label; version v > 0 lacks one of its voxels, which one depends on v."""
    label = learnable_volume(int(image[4:]), SHAPE)[1].copy()
    if version:
        voxels = np.flatnonzero(label)
        label.flat[voxels[version % len(voxels)]] = 0
    return label


class Ledger:
    """What the client was told: the acknowledged version of each (image, tag), and the versions whose save got
    no answer (the server was killed), which may or may not have replaced it."""

    def __init__(self, folder: Path):
        self.acked: dict[tuple[str, str], int] = {(image, "final"): 0 for image in LABELLED}
        self.unanswered: dict[tuple[str, str], set[int]] = {}
        self.next_version = 1
        self.acks = 0
        self.errors: list[str] = []
        self.folder = folder

    def save(self, server: Server, image: str, tag: str) -> bool:
        """PUT a new version of the label; True when the server acknowledged it."""
        version, self.next_version = self.next_version, self.next_version + 1
        path = self.folder / f"{image}_v{version}.nii.gz"
        write_image(label_array(image, version), path, **GEOMETRY)
        self.unanswered.setdefault((image, tag), set()).add(version)
        try:
            r = requests.put(
                f"{server.url}/datastore/label",
                params={"image": image, "tag": tag},
                files={"label": (f"{image}.nii.gz", path.read_bytes())},
                data={"params": json.dumps({"version": version})},
                timeout=120,
            )
        except requests.RequestException:
            return False
        finally:
            path.unlink()
        if r.status_code != 200:
            self.errors.append(f"{r.status_code}: {r.text}")
            return False
        self.acked[image, tag] = version
        self.unanswered.pop((image, tag))
        self.acks += 1
        return True

    def allowed(self, key: tuple[str, str]) -> set[int]:
        return {self.acked[key], *self.unanswered.get(key, ())}


def verify_labels(server: Server, studies: Path, ledger: Ledger) -> int:
    """Every acknowledged label is on disk, whole, equal to what was acknowledged (or to the save in flight when
    the server died) and listed under its tag; no unfinished write is left. Returns the labels checked."""
    assert not ledger.errors, ledger.errors
    objects = server.get("/datastore/?output=all").json()["objects"]
    for key in ledger.acked:
        image, tag = key
        path = studies / "labels" / tag / f"{image}.nii.gz"
        assert path.exists(), f"acknowledged label {key} is gone"
        saved = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        matches = [v for v in ledger.allowed(key) if np.array_equal(saved, label_array(image, v))]
        assert matches, f"label {key} holds none of the versions {ledger.allowed(key)}"
        listed = objects.get(image, {}).get("labels", {}).get(tag)
        assert listed is not None, f"label {key} is not listed in /datastore/"
        assert listed["info"].get("version", 0) in ledger.allowed(key), (key, listed)
    assert not list(studies.rglob("*.part")), list(studies.rglob("*.part"))
    return len(ledger.acked)


def wait_for(predicate, timeout: float, what: str, server: Server | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            log = server.log.read_text()[-3000:] if server else ""
            raise AssertionError(f"timed out waiting for {what}\n{log}")
        time.sleep(0.1)


def train_status(server: Server) -> str | None:
    return server.get("/train/").json().get("status")


def publishing_setup(root: Path, images: int = 5, labelled: int = 4) -> tuple[Path, dict[str, str], Path]:
    """Studies (``images`` volumes, the first ``labelled`` with a final label), a small random model, and an
    earlier fine-tune's checkpoint as the served one; returns (studies, server conf, published checkpoint)."""
    config = small_config_file(root)
    torch.manual_seed(0)
    ckpt = root / "random_small.pt"
    save_checkpoint(build_model(config), ckpt)
    # an earlier fine-tune, served from the start; its object-score head says "no object" everywhere, so
    # its validation Dice is 0 and the first epoch of a run is sure to improve on it (and publish)
    published = root / "published" / "finetuned.pt"
    torch.manual_seed(1)
    earlier = build_model(config)
    torch.nn.init.zeros_(earlier.sam_mask_decoder.pred_obj_score_head.layers[-1].weight)
    torch.nn.init.zeros_(earlier.sam_mask_decoder.pred_obj_score_head.layers[-1].bias)
    save_checkpoint(earlier, published)
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for seed in range(images):
        write_image(learnable_volume(seed, SHAPE)[0].astype(np.int16), studies / f"case{seed}.nii.gz", **GEOMETRY)
        if seed < labelled:
            write_image(label_array(f"case{seed}", 0), studies / "labels" / "final" / f"case{seed}.nii.gz", **GEOMETRY)
    conf = {"checkpoint": str(ckpt), "model_config": str(config), "window": "128,256"}
    conf |= {"finetuned_checkpoint": str(published), "device": "cpu"}
    return studies, conf, published


@pytest.fixture()
def setup(tmp_path):
    """Studies (4 labelled volumes, 1 unlabelled), a small random model, and an earlier fine-tune's checkpoint."""
    studies, conf, published = publishing_setup(tmp_path)
    return tmp_path, studies, conf, published


def test_kills_lose_no_acknowledged_label_and_the_server_recovers(setup):
    tmp_path, studies, conf, published = setup
    (tmp_path / "uploads").mkdir()
    ledger = Ledger(tmp_path / "uploads")
    servers: list[Server] = []

    def start(pause_at: str | None = None) -> tuple[Server, Path]:
        marker = tmp_path / f"paused_{len(servers) + 1}"
        env = {PAUSE_AT_ENV: pause_at, PAUSE_MARKER_ENV: str(marker)} if pause_at else {}
        log = tmp_path / f"server_{len(servers) + 1}.log"
        servers.append(start_server(studies, conf, log, env=env, own_process_group=True))
        return servers[-1], marker

    try:
        kills, checked, stream_acks = _kill_and_restart(studies, published, ledger, start)
    finally:
        for server in servers:
            if server.proc.poll() is None:
                kill_server(server)
    print(
        f"\ncrash safety: {kills} kills, {ledger.acks} labels acknowledged ({stream_acks} in the stream), "
        f"{checked} labels checked after each restart, 0 lost"
    )


def _kill_and_restart(studies: Path, published: Path, ledger: Ledger, start) -> tuple[int, int, int]:
    """The four server lives; returns (kills, labels checked, labels acknowledged during the stream of saves)."""
    kills = 0

    def save_until_paused(server: Server, marker: Path, image: str, tag: str) -> None:
        """The save that reaches the pause point never answers: send it from a thread, wait for the marker."""
        threading.Thread(target=ledger.save, args=(server, image, tag), daemon=True).start()
        wait_for(marker.exists, 120, f"pause marker {marker.name}", server)

    # 1. a label save killed after its temporary file is written, before it replaces the label acked earlier
    server, marker = start("label_save_before_label_replace#2")
    assert ledger.save(server, "case1", "reviewed")
    save_until_paused(server, marker, "case1", "reviewed")
    kill_server(server)
    kills += 1
    assert list((studies / "labels" / "reviewed").glob(".case1.nii.gz.*.part"))  # the kill hit the window
    ledger.unanswered.pop(("case1", "reviewed"))  # the label file was not replaced: the acked one must be there

    # 2. a training epoch, killed together with a label save stopped before its index update
    server, marker = start("label_save_before_index_replace#2")
    verify_labels(server, studies, ledger)
    assert ledger.save(server, "case2", "final")
    assert server.post("/train/medsam2", json={"epochs": 1, "steps_per_epoch": 10000, "clip_length": 3}).ok
    wait_for(lambda: "validation before training" in server.log.read_text(), 240, "the first epoch", server)
    assert train_status(server) == "RUNNING"
    save_until_paused(server, marker, "case0", "final")  # (the server answers nothing from here on)
    time.sleep(random.uniform(0.2, 1.0))
    kill_server(server)
    kills += 1
    assert list(studies.glob(".datastore_v2.json.*.part"))

    # 3. a checkpoint publish, while labels are being saved: the kill lands at a random moment of the saves
    published_before = hashlib.sha256(published.read_bytes()).hexdigest()
    server, marker = start("checkpoint_publish_before_replace")
    verify_labels(server, studies, ledger)
    assert server.get("/info/").json()["train_stats"]["medsam2"].get("status") != "RUNNING"  # killed run
    assert server.post("/train/medsam2", json=PUBLISHING_RUN).ok
    stream_acks = ledger.acks

    def save_stream() -> None:
        keys = [(image, tag) for tag in TAGS for image in LABELLED]
        while ledger.save(server, *keys[ledger.next_version % len(keys)]):
            time.sleep(0.5)  # leaves the CPU to the training run on a small machine

    stream = threading.Thread(target=save_stream, daemon=True)
    stream.start()
    wait_for(marker.exists, 300, "the publish", server)
    time.sleep(random.uniform(0.0, 0.5))
    kill_server(server)
    kills += 1
    stream.join(timeout=150)
    stream_acks = ledger.acks - stream_acks
    assert stream_acks >= 3, "the saves did not overlap the training run"
    assert list(published.parent.glob(".finetuned.pt.*.part"))
    assert hashlib.sha256(published.read_bytes()).hexdigest() == published_before

    # 4. after the kills: labels intact, the served checkpoint loads, training runs again
    server, _ = start()
    checked = verify_labels(server, studies, ledger)
    assert not list(published.parent.glob("*.part"))
    assert server.get("/info/").json()["checkpoints"]["medsam2"]["serving"].endswith("+finetuned")
    params = {"label": "lesion", "roi": [10, 38, 10, 38, 6, 6], "slice": 6}
    r = server.post("/infer/medsam2_2d?image=case4&output=json", data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["checkpoint"].endswith("+finetuned")
    assert server.post("/train/medsam2", json={**PUBLISHING_RUN, "steps_per_epoch": 1}).ok
    wait_for(lambda: train_status(server) in ("DONE", "ERROR"), 300, "the training run", server)
    assert train_status(server) == "DONE", server.log.read_text()[-3000:]
    assert ledger.save(server, "case3", "reviewed")
    verify_labels(server, studies, ledger)
    stop_server(server)
    return kills, checked, stream_acks


def test_cleanup_leaves_a_live_writers_temporary_file_alone(tmp_path):
    target = tmp_path / "index.json"
    with atomic_write(target) as live:
        Path(live).write_text("{}")
        dead = tmp_path / f".{target.name}.abcd1234.part"  # what a killed writer leaves: no lock held
        dead.write_text("{")
        assert remove_stale_temp_files(tmp_path) == [dead]
        assert Path(live).exists()
        with open(live) as f:  # the writer's lock is what protects it
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert target.read_text() == "{}" and not list(tmp_path.glob("*.part"))
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_an_index_truncated_by_a_crash_of_stock_monai_label_is_rebuilt_at_start(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    from lib.storage.local_datastore import DurableLocalDatastore

    (tmp_path / "labels" / "final").mkdir(parents=True)
    write_image(learnable_volume(0, SHAPE)[0].astype(np.int16), tmp_path / "case0.nii.gz", **GEOMETRY)
    write_image(label_array("case0", 0), tmp_path / "labels" / "final" / "case0.nii.gz", **GEOMETRY)
    DurableLocalDatastore(str(tmp_path), auto_reload=False)
    index = tmp_path / "datastore_v2.json"
    index.write_text(index.read_text()[:40])  # what LocalDatastore's in-place rewrite leaves when killed
    with pytest.raises(ValueError):  # stock MONAI Label: the server does not start
        LocalDatastore(str(tmp_path), auto_reload=False)
    datastore = DurableLocalDatastore(str(tmp_path), auto_reload=False)
    assert datastore.get_labels_by_image_id("case0") == {"final": "case0"}
    (aside,) = tmp_path.glob("datastore_v2.json.unreadable-*")
    assert len(aside.read_text()) == 40 and json.loads(index.read_text())["objects"]["case0"]
