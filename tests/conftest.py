"""Fixtures: a random-weights checkpoint in the official format, a studies folder, a real MONAI Label server."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch

from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, save_checkpoint
from sam2_testing import (
    APP_DIR,
    REFERENCE_CHECKPOINT,
    REFERENCE_CONFIG,
    blob_volume,
    object_present_bias,
    small_config_file,
)
from sam2_testing import reference_model as load_reference_model

REPO = APP_DIR.parents[1]
ARTIFACTS = REPO / "test-artifacts"
sys.path.insert(0, str(REPO / "scripts"))
from local_orthanc import free_port  # noqa: E402, F401  (the tests import it from here)

pytest_plugins = ["fuzz_testing"]  # the fuzz tests' fixtures (fuzz_server, report_counts)

# Markers (registered in pyproject.toml). A test is marked by what it starts: the names below, called by the test,
# by one of its fixtures or by a function of their module, mark it. The fast loop deselects the marked tests:
#   pytest -m "not server and not pacs and not browser and not slow"
STARTERS = {"start_server": "server", "Orthanc": "pacs", "chromium": "browser"}
_running_test: pytest.Item | None = None


def _names_called(func: types.FunctionType, seen: set[types.CodeType]) -> set[str]:
    """Global and attribute names a function's code refers to, following nested code and its module's functions."""
    names: set[str] = set()
    codes = [func.__code__]
    while codes:
        code = codes.pop()
        if code in seen:
            continue
        seen.add(code)
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        module = sys.modules.get(func.__module__)
        for name in code.co_names:
            helper = getattr(module, name, None)
            if inspect.isfunction(helper) and helper.__module__ == func.__module__:
                codes.append(helper.__code__)
    return names


# the longest files first (CI's --durations, 2 workers; scripts/test.sh keeps this order with
# --no-loadscope-reorder): with --dist loadfile a worker takes the next file when it is done, and xdist's own order
# (the most tests first) put test_training.py (2 tests, ~190 s) near the end, alone on one worker
LONGEST_FIRST = (
    "test_training.py",
    "test_slicer_buttons.py",
    "test_crash_safety.py",
    "test_replicas.py",
    "test_ohif_panel.py",
    "test_ohif_login.py",
    "test_pacs_demo.py",
    "test_training_ddp.py",
    "test_encode_ahead.py",
    "test_active_learning_loop.py",
)


def _file_rank(item: pytest.Item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test ``server``/``pacs``/``browser`` by what it starts; skip ``gpu`` tests without CUDA; the
    longest files first (a stable sort: each file's tests keep their order)."""
    items.sort(key=_file_rank)
    cuda = torch.cuda.is_available()
    for item in items:
        funcs = [item.function] if isinstance(item, pytest.Function) else []
        for defs in item._fixtureinfo.name2fixturedefs.values():
            funcs += [d.func for d in defs if inspect.isfunction(d.func)]
        seen: set[types.CodeType] = set()
        names = set().union(*(_names_called(f, seen) for f in funcs))
        for marker in sorted({STARTERS[n] for n in names & STARTERS.keys()}):
            item.add_marker(marker)
        if not cuda and item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Remember the running test, for the check in :func:`start_server`."""
    global _running_test
    _running_test = item
    try:
        return (yield)
    finally:
        _running_test = None


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A MedSAM2-shaped (hiera-t 512) model with random weights, saved as {"model": state_dict}."""
    torch.manual_seed(0)
    model = object_present_bias(build_model(MEDSAM2_CONFIG))
    path = tmp_path_factory.mktemp("ckpt") / "random_medsam2.pt"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="session")
def small_random_conf(tmp_path_factory) -> dict[str, str]:
    """``--conf`` for MedSAM2's architecture at 128 input with random weights (objects 'present'): what the
    shared ``server`` serves. The app's requests, answers and errors do not depend on the input size, and a slice
    costs about a sixteenth of the 512 model's (MedSAM2's own size is served where a test needs it:
    :func:`random_checkpoint`)."""
    folder = tmp_path_factory.mktemp("small_random")
    config = small_config_file(folder, 128)
    torch.manual_seed(0)
    path = folder / "random_medsam2_128.pt"
    save_checkpoint(object_present_bias(build_model(config)), path)
    return {"checkpoint": str(path), "model_config": str(config)}


@pytest.fixture(scope="session")
def reference_checkpoint() -> tuple[Path, Path]:
    """(checkpoint, model config) of the reference model, for ``--conf checkpoint`` and ``--conf model_config``."""
    assert REFERENCE_CHECKPOINT.is_file(), f"{REFERENCE_CHECKPOINT} is missing: see docs/reference_model.md"
    return REFERENCE_CHECKPOINT, REFERENCE_CONFIG


@pytest.fixture(scope="session")
def reference_model(reference_checkpoint) -> torch.nn.Module:
    """The reference model on the CPU in eval mode (shared by the session: deep-copy it before changing it)."""
    return load_reference_model("cpu")


def write_image(array_kji: np.ndarray, path: Path, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return image


@pytest.fixture(scope="session")
def studies(tmp_path_factory) -> Path:
    """A local datastore: a CT-like volume with flipped axes, a 2D image, and a file that is not an image."""
    root = tmp_path_factory.mktemp("studies")
    write_image(
        blob_volume((16, 80, 96), radius=12.0),
        root / "ct_blob.nii.gz",
        spacing=(0.7, 0.8, 2.5),
        origin=(-30.0, 12.5, 100.0),
        direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    )
    write_image(
        blob_volume((1, 64, 64), radius=10.0)[0],
        root / "xray_2d.nii.gz",
        spacing=(0.5, 0.5),
        origin=(0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 1.0),
    )
    (root / "broken.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    return root


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url = url
        self.proc = proc
        self.log = log

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 300), **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None and self.get("/info/").status_code == 200


def start_server(
    studies: Path,
    conf: dict[str, str],
    log: Path,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    ready_headers: dict[str, str] | None = None,
    own_process_group: bool = False,
) -> Server:
    """Start the server; ``env`` adds environment variables, ``ready_headers`` go with the readiness probe;
    ``own_process_group``: the server and the processes it starts can be killed together (:func:`kill_server`)."""
    if _running_test is not None and not _running_test.get_closest_marker("server"):
        raise RuntimeError(f"{_running_test.nodeid} starts a server but is not marked: see STARTERS in conftest.py")
    port = free_port()
    env = {**os.environ, **(env or {})}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = ["monailabel", "start_server", "--app", str(APP_DIR), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    # never serve (or overwrite) a fine-tuned checkpoint lying in the app's model folder; the OpenVINO encoder's
    # compilation and the warm-up cost CPU at every start: on only where a test asks (test_server_encode_ahead.py)
    # no cap on live sessions: servers shared by many tests open more sessions than any one annotator would
    # (tests/test_sessions.py and bench/session_limits.py set it)
    defaults = {"cpu_encoder": "torch", "warm_up": "off", "max_live_sessions": "0"}
    conf = {"finetuned_checkpoint": str(log.parent / "finetuned.pt"), **defaults, **conf}
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    handle = open(log, "w")
    proc = subprocess.Popen(
        cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=own_process_group
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/info/", headers=ready_headers, timeout=2).status_code == 200:
                return Server(url, proc, log)
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def kill_server(server: Server) -> None:
    """SIGKILL a server started with ``own_process_group`` and every process it started (e.g. training)."""
    pgid = server.proc.pid
    assert os.getpgid(pgid) == pgid != os.getpgrp(), "start the server with own_process_group=True"
    os.killpg(pgid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline:  # the children are reaped by init
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {pgid} survived SIGKILL")


def wait_for_training(server: Server, timeout_s: float) -> dict:
    """Poll ``GET /train/`` until the run is DONE or ERROR (or ``timeout_s`` passed); its last status."""
    deadline = time.time() + timeout_s
    while True:
        status = server.get("/train/").json()
        if status.get("status") in ("DONE", "ERROR") or time.time() > deadline:
            return status
        time.sleep(2)


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def server(studies, small_random_conf, tmp_path_factory):
    """The real MONAI Label server running this app on the test studies."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(studies, {**small_random_conf, "window": "abdomen"}, log)
    yield srv
    stop_server(srv)
