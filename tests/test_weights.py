"""Weights through huggingface_hub with a pinned SHA-256 (lib/engine/checkpoints.py, scripts/download_weights.py):
a download from a Hub stand-in on 127.0.0.1 (``HF_ENDPOINT``, as a mirror is named), the offline path
(``HF_HUB_OFFLINE=1``, the file already there), and a wrong hash, a truncated file and an unreachable hub: each one
line and exit code 2, as the server stops at start (lib/server/startup.py)."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import free_port
from lib.engine.checkpoints import CheckpointError, pinned_hashes, resolve_checkpoint, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import download_weights  # noqa: E402

WEIGHTS = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(WEIGHTS).hexdigest()
URL = "https://huggingface.co/lab/model/resolve/main/weights.pt"


@pytest.fixture()
def hub():
    """``HEAD``/``GET /<repo>/resolve/<revision>/<file>`` as the Hub answers them (commit, ETag = the LFS SHA-256,
    ranges for resumed downloads); the paths asked are kept."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _head(self) -> bytes | None:
            asked.append(f"{self.command} {self.path}")
            if self.path != "/lab/model/resolve/main/weights.pt":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            start = int(self.headers.get("Range", "bytes=0-").split("=")[1].split("-")[0] or 0)
            body = WEIGHTS[start:]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", "c" * 40)
            self.send_header("ETag", f'"{SHA}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return body

        def do_HEAD(self) -> None:
            self._head()

        def do_GET(self) -> None:
            body = self._head()
            if body:
                self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", asked
    httpd.shutdown()
    httpd.server_close()


def download(model_dir: Path, endpoint: str, sha: str = SHA, offline: bool = False, monkeypatch=None, capsys=None):
    """scripts/download_weights.py in this process (its environment set): (exit code, its stderr)."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(model_dir / "hf_home"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    capsys.readouterr()
    code = download_weights.main([URL, "--model-dir", str(model_dir), "--sha256", sha])
    return code, capsys.readouterr().err


def one_line(done: tuple[int, str]) -> str:
    code, err = done
    lines = [line for line in err.splitlines() if line.startswith("download_weights:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    return lines[0]


def test_download_through_the_hub_library_then_offline(hub, tmp_path, monkeypatch, capsys):
    endpoint, asked = hub
    code, err = download(tmp_path, endpoint, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err[-2000:]
    assert (tmp_path / "weights.pt").read_bytes() == WEIGHTS
    assert any(a.startswith("GET /lab/model/resolve/main/weights.pt") for a in asked)
    asked.clear()
    # no network: the file is there and checked
    code, err = download(tmp_path, "http://127.0.0.1:9", offline=True, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and not asked, err[-2000:]


def test_a_wrong_hash_a_truncated_file_and_an_unreachable_hub_each_stop_with_one_line(
    hub, tmp_path, monkeypatch, capsys
):
    endpoint, _ = hub
    kw = {"monkeypatch": monkeypatch, "capsys": capsys}
    wrong = one_line(download(tmp_path / "a", endpoint, sha="0" * 64, **kw))
    assert f"has SHA-256 {SHA}, not the pinned {'0' * 64}" in wrong and "delete it" in wrong
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "weights.pt").write_bytes(WEIGHTS[:1000])  # an interrupted copy
    truncated = one_line(download(tmp_path / "b", endpoint, offline=True, **kw))
    assert "not the pinned" in truncated
    unreachable = one_line(download(tmp_path / "c", f"http://127.0.0.1:{free_port()}", **kw))
    assert "Could not download checkpoint 'weights.pt'" in unreachable and "HF_ENDPOINT" in unreachable
    offline_missing = one_line(download(tmp_path / "d", endpoint, offline=True, **kw))
    assert "HF_HUB_OFFLINE is set" in offline_missing


def test_the_script_exits_2_with_one_line(tmp_path):
    """The same as a process: exit code 2, one line on stderr."""
    (tmp_path / "weights.pt").write_bytes(WEIGHTS[:10])
    cmd = [sys.executable, "scripts/download_weights.py", URL, "--model-dir", str(tmp_path), "--sha256", SHA]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if line.strip()][-1].startswith("download_weights:")
    assert sum(line.startswith("download_weights:") for line in done.stderr.splitlines()) == 1


def test_the_pinned_table_names_the_reference_checkpoint():
    pinned = pinned_hashes()
    assert (
        pinned["reference_sam2.pt"]
        == hashlib.sha256((REPO / "tests/fixtures/reference_sam2.pt").read_bytes()).hexdigest()
    )
    resolved = resolve_checkpoint(str(REPO / "tests/fixtures/reference_sam2.pt"))
    assert verify_checkpoint(resolved) == pinned["reference_sam2.pt"]


def test_a_file_of_a_pinned_name_with_another_hash_is_refused(tmp_path):
    fake = tmp_path / "reference_sam2.pt"
    fake.write_bytes(b"not the reference weights")
    with pytest.raises(CheckpointError, match="not the pinned"):
        verify_checkpoint(resolve_checkpoint(str(fake)))
