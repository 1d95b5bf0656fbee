"""The launcher's supervision (scripts/replicas.py ``Child``): a process that exits is started again after a
back-off of 1 s, doubling up to 60 s while it keeps dying, and back to 1 s once it has run for a minute. Real
processes (``true``, ``sleep``), a simulated clock. The launcher with real replicas: tests/test_replicas.py."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from replicas import Child, stop_all  # noqa: E402


def _dies_at_once() -> subprocess.Popen:
    return subprocess.Popen(["true"])


def _restart(child: Child, now: float) -> float:
    """Let the process exit, let the supervisor see it at ``now``; the back-off it chose (s)."""
    child.process.wait(timeout=30)
    child.check(now)
    assert child.restart_at is not None
    return child.restart_at - now


def test_a_process_that_keeps_dying_is_restarted_after_a_doubling_back_off(capsys):
    child = Child("replica-1", _dies_at_once)
    child.launch(now=0.0)
    now, waits = 0.0, []
    for _ in range(9):
        waits.append(_restart(child, now))
        now = child.restart_at
        child.check(now - 0.01)  # not yet
        assert child.restarts == len(waits) - 1
        child.check(now)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60] and child.restarts == 9
    said = capsys.readouterr().out
    assert "replicas: replica-1 (pid" in said and "exited with status 0: restarting it in 1 s" in said
    assert "replica-1 restarted (pid" in said
    child.process.wait(timeout=30)


def test_after_a_minute_of_running_the_back_off_starts_again_at_one_second():
    child = Child("replica-1", _dies_at_once)
    child.launch(now=0.0)
    for now in (0.0, 1.0, 3.0):  # three quick deaths: the next wait would be 8 s
        _restart(child, now)
        child.check(child.restart_at)
    assert child.backoff_s == 8
    assert _restart(child, child.started_at + 61) == 1  # this one had run for 61 s
    child.check(child.restart_at)
    child.process.wait(timeout=30)


def test_stop_ends_a_running_process_and_its_group():
    child = Child("replica-1", lambda: subprocess.Popen(["sleep", "60"], start_new_session=True))
    child.launch()
    child.check(child.started_at + 1)
    assert child.process.poll() is None and child.restart_at is None
    child.stop()
    assert child.process.returncode == -15


def test_stop_all_terminates_every_replica_at_once_then_the_front():
    def sleeper() -> subprocess.Popen:
        return subprocess.Popen(["sleep", "60"], start_new_session=True)

    children = [Child("nginx", lambda: subprocess.Popen(["sleep", "60"])), Child("replica-1", sleeper)]
    children.append(Child("replica-2", sleeper))
    for child in children:
        child.launch()
    children[2].process.kill()  # one is dead already (waiting for its restart): nothing to stop
    children[2].process.wait(timeout=30)
    stop_all(children, wait_s=10)
    assert [c.process.returncode for c in children] == [-15, -15, -9]
