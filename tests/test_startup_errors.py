"""A server that cannot start says why in one line (exit status 2), not inside a uvicorn traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port
from sam2_testing import APP_DIR, REFERENCE_CHECKPOINT

pytestmark = pytest.mark.server  # starts `monailabel start_server` (which must fail) as a subprocess


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        (["window", "sunset"], "Unknown intensity window 'sunset'"),
        (["checkpoint", "/nonexistent/medsam2.pt"], "/nonexistent/medsam2.pt"),
        (["dicomweb_timeout_s", "-1"], "--conf dicomweb_timeout_s must be seconds"),
        (["max_session_gb", "6GB"], "--conf max_session_gb must be a number of GiB, more than 0, got '6GB'"),
        (["max_sesions", "8"], "Unknown --conf key 'max_sesions' (did you mean max_sessions?)"),
        # a checkpoint file that is not the one pinned (a truncated or altered download): issue 32 item 6
        (["checkpoint", str(REFERENCE_CHECKPOINT), "checkpoint_sha256", "0" * 64], f"not the pinned {'0' * 64}"),
    ],
)
def test_bad_settings_stop_the_server_with_one_clear_line(tmp_path: Path, conf: list[str], expected: str) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    cmd = ["monailabel", "start_server", "--app", str(APP_DIR), "--studies", str(tmp_path), "--port", str(free_port())]
    for key, value in zip(conf[::2], conf[1::2], strict=True):
        cmd += ["--conf", key, value]
    cmd += ["--conf", "finetuned_checkpoint", str(tmp_path / "finetuned.pt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(REPO))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    line = next((x for x in output.splitlines() if x.startswith("The MedSAM2 app cannot start: ")), "")
    assert expected in line, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
