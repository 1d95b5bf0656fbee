"""Atomic writes (lib.atomic_files): a file or folder is its old or its new content, flushed to disk; a killed
writer leaves only a temporary file or folder, which the cleanup removes, and a live writer's is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lib.atomic_files import atomic_folder, atomic_write, remove_stale_temp_files, write_json_atomic

APP = Path(__file__).resolve().parents[1] / "apps" / "medsam2"

# A writer in its own process: it fills the temporary file (or folder) of the target, prints its name, and
# waits on stdin; the test then kills it (a crash mid-write) or lets it finish (a newline).
WRITER = """
import sys
from pathlib import Path
from lib.atomic_files import atomic_folder, atomic_write

target, kind = sys.argv[1], sys.argv[2]
if kind == "file":
    with atomic_write(target) as tmp:
        Path(tmp).write_text("new, half written")
        print(tmp, flush=True)
        sys.stdin.readline()
else:
    with atomic_folder(target) as tmp:
        (tmp / "a.dcm").write_text("new a")
        print(tmp, flush=True)
        sys.stdin.readline()
        (tmp / "b.dcm").write_text("new b")
"""


class Writer:
    """A child process in the middle of an atomic write of ``target``."""

    def __init__(self, target: Path, kind: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APP), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self.process.stdout is not None
        self.temp = Path(self.process.stdout.readline().strip())
        assert self.temp.exists(), "the writer did not start"

    def crash(self) -> None:
        self.process.kill()
        self.process.wait(30)

    def finish(self) -> None:
        self.process.communicate("\n", timeout=30)
        assert self.process.returncode == 0


@pytest.fixture
def count_fsync(monkeypatch) -> list[int]:
    """The descriptors os.fsync is called on, in order."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_a_crash_mid_write_leaves_the_old_file_and_a_temp_file_the_cleanup_removes(tmp_path):
    target = tmp_path / "stats.json"
    target.write_text("old")
    writer = Writer(target, "file")
    writer.crash()
    assert target.read_text() == "old"
    assert remove_stale_temp_files(tmp_path) == [writer.temp]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_an_error_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "stats.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        Path(tmp).write_text("new, half written")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_a_write_flushes_the_file_and_its_folder(tmp_path, count_fsync):
    target = tmp_path / "stats.json"
    write_json_atomic(target, {"status": "RUNNING", "epoch": 1})
    assert len(count_fsync) == 2  # the file, then the folder (the rename)
    assert json.loads(target.read_text()) == {"status": "RUNNING", "epoch": 1}
    write_json_atomic(tmp_path / "new" / "folder" / "stats.json", {"n": 2})  # its folder is created
    assert json.loads((tmp_path / "new" / "folder" / "stats.json").read_text()) == {"n": 2}


def test_cleanup_leaves_a_live_writers_temp_file_alone_and_removes_it_once_the_writer_died(tmp_path):
    target = tmp_path / "finetuned.pt"
    target.write_text("old")
    dead = Writer(target, "file")
    dead.crash()
    live = Writer(target, "file")
    try:
        assert remove_stale_temp_files(tmp_path) == [dead.temp]
        assert live.temp.exists()
    finally:
        live.finish()
    assert target.read_text() == "new, half written" and not live.temp.exists()
    assert remove_stale_temp_files(tmp_path) == []


def test_the_trainer_cleanup_after_a_failed_run_spares_a_live_writer(tmp_path):
    from lib.trainers.medsam2 import _remove_partial_files

    published, stats = tmp_path / "finetuned.pt", tmp_path / "train_stats.json"
    dead = Writer(published, "file")
    dead.crash()
    live = Writer(stats, "file")
    try:
        _remove_partial_files(published, stats)
        assert not dead.temp.exists() and live.temp.exists()
    finally:
        live.finish()
    assert stats.read_text() == "new, half written"


def test_a_folder_write_is_all_or_nothing(tmp_path, count_fsync):
    series = tmp_path / "images" / "1.2.3"  # its parent is created
    with pytest.raises(RuntimeError), atomic_folder(series) as tmp:
        (tmp / "a.dcm").write_text("a")
        raise RuntimeError("the download failed")
    assert not series.exists() and list(series.parent.iterdir()) == []

    with atomic_folder(series) as tmp:
        assert tmp.parent == series.parent and not series.exists()
        (tmp / "a.dcm").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.dcm").write_text("b")
    assert (series / "a.dcm").read_text() == "a" and (series / "sub" / "b.dcm").read_text() == "b"
    assert list(series.parent.iterdir()) == [series]
    assert len(count_fsync) >= 5  # two files, two folders, the parent (the rename)
    assert series.stat().st_mode & 0o777 == 0o777 & ~_umask()

    with pytest.raises(RuntimeError), atomic_folder(series) as tmp:  # a failed replacement keeps the old one
        (tmp / "c.dcm").write_text("c")
        raise RuntimeError("the download failed")
    assert sorted(p.name for p in series.iterdir()) == ["a.dcm", "sub"]

    with atomic_folder(series) as tmp:  # a complete one replaces it, whole
        (tmp / "c.dcm").write_text("c")
    assert sorted(p.name for p in series.iterdir()) == ["c.dcm"] and list(series.parent.iterdir()) == [series]


def test_a_crashed_folder_write_leaves_the_old_folder_and_the_cleanup_spares_a_live_one(tmp_path):
    series = tmp_path / "1.2.3"
    series.mkdir()
    (series / "old.dcm").write_text("old")
    dead = Writer(series, "folder")
    dead.crash()
    assert sorted(p.name for p in series.iterdir()) == ["old.dcm"] and dead.temp.is_dir()
    live = Writer(series, "folder")
    try:
        assert remove_stale_temp_files(tmp_path) == [dead.temp]
        assert live.temp.is_dir() and not dead.temp.exists()
    finally:
        live.finish()
    assert sorted(p.name for p in series.iterdir()) == ["a.dcm", "b.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.2.3"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_two_datastores_on_one_folder_keep_every_label_and_see_each_others(tmp_path):
    """Two datastore objects on one folder behave like two replicas (each its own file lock handle and index
    copy): labels saved concurrently by both, from several threads each, are all in the index and both list
    them, with their last version."""
    from lib.storage.local_datastore import DurableLocalDatastore

    images = [f"img{i}" for i in range(6)]
    for image in images:
        (tmp_path / f"{image}.nii.gz").write_bytes(b"image")
    stores = [DurableLocalDatastore(str(tmp_path), auto_reload=False) for _ in range(2)]
    label = tmp_path.parent / f"{tmp_path.name}_label.nii.gz"
    label.write_bytes(b"label")

    def save_versions(store, image):
        for version in range(1, 11):
            store.save_label(image, str(label), "final", {"version": version})
            store.update_label_info(image, "final", {"checked": version})

    threads = [threading.Thread(target=save_versions, args=(stores[i % 2], img)) for i, img in enumerate(images)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index = json.loads((tmp_path / "datastore_v2.json").read_text())
    for store in [*stores, DurableLocalDatastore(str(tmp_path), auto_reload=False)]:
        for image in images:
            info = store.get_label_info(image, "final")
            assert (info["version"], info["checked"]) == (10, 10), (image, info)
    assert all(index["objects"][i]["labels"]["final"]["info"]["version"] == 10 for i in images)
