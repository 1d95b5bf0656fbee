"""The cross-replica training lock (lib/training/lease.py) and the weights' licence in /info."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from lib.engine.checkpoints import MEDSAM2_LICENCE, SAM21_LICENCE, UNKNOWN_LICENCE, resolve_checkpoint
from lib.training.lease import TrainingLease
from sam2_testing import APP_DIR


def test_one_holder_at_a_time_and_the_others_learn_who(tmp_path):
    a, b = TrainingLease(tmp_path, "r1"), TrainingLease(tmp_path, "r2")
    assert a.holder() is None and b.holder() is None
    assert a.try_acquire("medsam2") is None
    held = b.try_acquire("medsam2")
    assert held is not None and (held.replica, held.model, held.pid) == ("r1", "medsam2", os.getpid())
    assert "replica 'r1'" in held.describe()
    assert a.try_acquire("medsam2") is not None  # the holder itself cannot start a second run either
    a.release()
    assert b.holder() is None
    assert b.try_acquire("medsam2") is None and a.holder().replica == "r2"
    b.release()


def test_the_watcher_releases_when_the_run_ends_and_never_a_later_run(tmp_path):
    lease = TrainingLease(tmp_path, "r1")
    running = {"now": True}
    assert lease.try_acquire("medsam2") is None
    lease.release_when_done(lambda: running["now"], every_s=0.02)
    time.sleep(0.1)
    assert lease.held_here
    running["now"] = False
    deadline = time.time() + 5
    while lease.held_here and time.time() < deadline:
        time.sleep(0.02)
    assert not lease.held_here
    # a run that never starts gives the lease back after the grace time
    assert lease.try_acquire("medsam2") is None
    lease.release_when_done(lambda: False, start_grace_s=0.1, every_s=0.02)
    time.sleep(0.5)
    assert not lease.held_here
    # an old watcher does not release a newer acquisition
    assert lease.try_acquire("medsam2") is None
    lease.release_when_done(lambda: True, every_s=0.02)  # watcher of run 1 sees it running
    lease.release()
    assert lease.try_acquire("medsam2") is None  # run 2
    time.sleep(0.1)
    assert lease.held_here
    lease.release()


def test_the_kernel_frees_the_lease_of_a_killed_holder(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(APP_DIR)!r})
        from lib.training.lease import TrainingLease
        lease = TrainingLease({str(tmp_path)!r}, "doomed")
        assert lease.try_acquire("medsam2") is None
        print("held", flush=True)
        time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    other = TrainingLease(tmp_path, "r2")
    assert other.try_acquire("medsam2").replica == "doomed"
    holder.kill()
    holder.wait()
    assert other.try_acquire("medsam2") is None
    other.release()


def test_a_training_process_stops_when_its_server_dies(tmp_path):
    """exit_when_orphaned: the 'server' (middle process) is SIGKILLed; its 'training' child exits by itself."""
    child = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(APP_DIR)!r})
        from lib.training.lease import exit_when_orphaned
        exit_when_orphaned(every_s=0.05)
        open({str(tmp_path / "child.pid")!r}, "w").write(str(__import__("os").getpid()))
        time.sleep(60)
        """
    )
    server = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    middle = subprocess.Popen([sys.executable, "-c", server])
    pid_file = tmp_path / "child.pid"
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    middle.kill()
    middle.wait()
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
        assert time.time() < deadline, "the orphaned training process did not stop"
        time.sleep(0.05)


def test_info_names_the_licence_of_the_weights(tmp_path):
    assert resolve_checkpoint("MedSAM2_latest", model_dir=tmp_path).licence == MEDSAM2_LICENCE == "CC-BY-SA-4.0"
    assert resolve_checkpoint("sam2.1_hiera_tiny", model_dir=tmp_path).licence == SAM21_LICENCE == "Apache-2.0"
    own = tmp_path / "own.pt"
    own.write_bytes(b"x")
    assert resolve_checkpoint(str(own)).licence == UNKNOWN_LICENCE == "unknown"
    assert resolve_checkpoint("https://example.org/w.pt", model_dir=tmp_path).licence == "unknown"
