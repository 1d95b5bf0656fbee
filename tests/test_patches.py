"""The app's changes to MONAI Label's server: declared once, applied and checked at start, failing closed.

Each case runs in a fresh interpreter: applying the patches changes MONAI Label's modules for good, and a
simulated upgrade (a patch target that moved) must not leak into other tests.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import monailabel
import pytest
import requests
from reference_docs import PATCHES_DOC, with_patches

from conftest import REPO, free_port
from lib.server.patches import MONAILABEL_INTERNALS, PATCHES, TESTED_MONAILABEL_VERSION
from sam2_testing import APP_DIR

# Imports the server module (so the code runs "inside the server"), applies the patches, prints the report.
INSTALL_ALL = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
sys.path.insert(0, {app_dir!r})
{before}
import monailabel.app
from monailabel.config import settings
from lib.server.operations import OperationsSource
from lib.server.patches import PatchContext, install_all
settings.MONAI_LABEL_AUTH_ENABLE = True
settings.MONAI_LABEL_AUTH_REALM_URI = "http://127.0.0.1:9/realms/none"  # unreachable: a warning, not a failure
settings.MONAI_LABEL_AUTH_TIMEOUT = 1
operations = OperationsSource("test", dict, list)
opened = lambda image, source: None  # noqa: E731
check_train = lambda model, body: None  # noqa: E731
report = install_all(
    PatchContext(settings, check_train, 4, 5.0, operations, opened, datastore=dict, sessions=lambda i, s: 0{context})
)
print("REPORT " + json.dumps(report.as_dict()))
"""


def _install_all(before: str = "", context: str = "") -> subprocess.CompletedProcess:
    code = INSTALL_ALL.format(app_dir=str(APP_DIR), before=textwrap.dedent(before), context=context)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(REPO))


def _report(done: subprocess.CompletedProcess) -> dict:
    line = next((x for x in done.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, (done.stdout + done.stderr)[-3000:]
    return json.loads(line[len("REPORT ") :])


def test_every_patch_says_what_it_replaces_and_why() -> None:
    names = [p.name for p in PATCHES]
    assert len(names) == len(set(names))
    assert all(p.replaces and p.why for p in PATCHES)
    assert {"request_guard", "access_control", "monailabel_internals"} <= {p.name for p in PATCHES if p.security}


@pytest.mark.slow
def test_every_patch_applies_to_the_tested_monailabel() -> None:
    report = _report(_install_all())
    assert report["monailabel"] == TESTED_MONAILABEL_VERSION and report["version_matches"] is True
    assert report["applied"] == [p.name for p in PATCHES], report
    assert report["failed"] == {} and report["not_needed"] == []


@pytest.mark.slow
def test_outside_the_server_nothing_is_patched() -> None:
    code = f"import sys; sys.path.insert(0, {str(APP_DIR)!r})\n" + textwrap.dedent(
        """
        import json
        from monailabel.endpoints import infer
        from monailabel.config import settings
        from lib.server.patches import PatchContext, install_all
        from lib.server.server_process import in_server
        report = install_all(PatchContext(settings, lambda m, b: None, infer_workers=4, dicomweb_timeout_s=5.0))
        print(json.dumps([in_server(), report.applied, hasattr(infer.run_inference, "_medsam2_guard")]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [False, [], False], done.stderr[-3000:]


@pytest.mark.slow
def test_a_version_mismatch_is_refused_unless_allowed_and_then_reported() -> None:
    upgraded = "import monailabel; monailabel.__version__ = '0.9.0'"
    refused = _install_all(upgraded)
    assert refused.returncode != 0 and "REPORT" not in refused.stdout
    assert "MONAI Label 0.9.0 is installed, but this app's changes" in refused.stderr, refused.stderr[-3000:]
    done = _install_all(upgraded, context=", allow_untested_monailabel=True")
    report = _report(done)
    assert (report["monailabel"], report["version_matches"], report["untested_allowed"]) == ("0.9.0", False, True)
    assert f"MONAI Label 0.9.0 is installed; tested with {TESTED_MONAILABEL_VERSION}" in done.stderr
    assert report["applied"] == [p.name for p in PATCHES]  # each patch still checked on its own


@pytest.mark.slow
def test_a_moved_non_security_target_is_a_warning() -> None:
    # a MONAI Label whose proxy routes no longer call proxy_dicom by name
    done = _install_all(
        """
        from monailabel.endpoints import proxy
        async def proxy_wado(request, path):
            return None
        proxy.proxy_wado = proxy_wado
        """
    )
    report = _report(done)
    assert set(report["failed"]) == {"pacs_proxy"} and "proxy_wado" in report["failed"]["pacs_proxy"]
    assert "pacs_proxy" not in report["applied"] and "request_guard" in report["applied"]
    assert "Patch 'pacs_proxy' not applied" in done.stderr


@pytest.mark.parametrize(
    ("sabotage", "patch"),
    [
        (  # the infer route calls something else than run_inference: the request guard would not be reached
            "from monailabel.endpoints import infer\nasync def api_run_inference(**kw):\n    return None\n"
            "infer.api_run_inference = api_run_inference\n",
            "request_guard",
        ),
        (  # LocalDatastore renamed a method the crash-safe datastore overrides
            "from monailabel.datastore.local import LocalDatastore\ndel LocalDatastore._update_datastore_file\n",
            "monailabel_internals",
        ),
    ],
)
@pytest.mark.server
def test_a_missing_security_target_refuses_to_start(tmp_path: Path, sabotage: str, patch: str) -> None:
    launcher = f"{sabotage}\nfrom monailabel.main import Main\nMain().run()\n"
    cmd = [sys.executable, "-c", launcher, "start_server", "--app", str(APP_DIR), "--studies", str(tmp_path)]
    cmd += ["--host", "127.0.0.1", "--port", str(free_port()), "--conf", "checkpoint", "random"]
    cmd += ["--conf", "finetuned_checkpoint", str(tmp_path / "finetuned.pt")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    line = next((x for x in output.splitlines() if x.startswith("The MedSAM2 app cannot start: ")), "")
    assert f"the security patch {patch!r}" in line and "install monailabel==0.8.5" in line, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def _start_command(tmp_path: Path, before: str, conf: list[str]) -> list[str]:
    """``monailabel start_server`` through MONAI Label's own entry point, after ``before`` ran in the process."""
    launcher = f"{before}\nfrom monailabel.main import Main\nMain().run()\n"
    cmd = [sys.executable, "-c", launcher, "start_server", "--app", str(APP_DIR), "--studies", str(tmp_path)]
    cmd += ["--host", "127.0.0.1", "--port", str(free_port()), "--conf", "checkpoint", "random"]
    return cmd + ["--conf", "finetuned_checkpoint", str(tmp_path / "finetuned.pt"), *conf]


UPGRADED = "import monailabel\nmonailabel.__version__ = '0.8.6'\n"  # what an untested MONAI Label reports


@pytest.mark.server
def test_an_untested_monailabel_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        _start_command(tmp_path, UPGRADED, []), capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO)
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    line = next((x for x in output.splitlines() if x.startswith("The MedSAM2 app cannot start: ")), "")
    assert "MONAI Label 0.8.6 is installed" in line and "tested with 0.8.5 only" in line, output[-3000:]
    assert "install monailabel==0.8.5, or start with --conf allow_untested_monailabel true" in line, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.server
def test_the_documented_override_starts_an_untested_monailabel_and_info_says_so(tmp_path: Path) -> None:
    cmd = _start_command(tmp_path, UPGRADED, ["--conf", "allow_untested_monailabel", "true"])
    port = cmd[cmd.index("--port") + 1]
    log = tmp_path / "server.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=str(REPO))
    try:
        info = None
        deadline = time.time() + 240
        while info is None and proc.poll() is None and time.time() < deadline:
            try:
                info = requests.get(f"http://127.0.0.1:{port}/info/", timeout=2).json()
            except requests.RequestException:
                time.sleep(0.5)
        assert info is not None, log.read_text()[-3000:]
        patches = info["patches"]
        assert (patches["monailabel"], patches["version_matches"], patches["untested_allowed"]) == (
            "0.8.6",
            False,
            True,
        )
        assert "request_guard" in patches["applied"] and not patches["failed"], patches
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _private_names_used(paths: list[Path]) -> set[str]:
    """Every ``x._name`` (not ``__dunder``) the code reads, sets or calls, and every ``_name`` method its classes
    define (an override)."""
    names: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text())
        names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
            names |= {f.name for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _monailabel_private_names() -> set[str]:
    """The private attributes and methods MONAI Label's own code defines (``self._x = ...``, ``def _x``)."""
    names: set[str] = set()
    for path in Path(monailabel.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8", errors="replace"))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_"):
                names.add(node.name)
    return {n for n in names if not n.startswith("__")}


# private names of the app's own classes that MONAI Label's code happens to use too (not MONAI Label's)
OWN_PRIVATES = {"_load"}  # ModelProvider._load


def test_every_monailabel_private_the_app_touches_is_declared() -> None:
    app_code = [APP_DIR / "main.py", *sorted((APP_DIR / "lib").rglob("*.py"))]
    declared = {name for names in MONAILABEL_INTERNALS.values() for name in names}
    touched = _private_names_used(app_code) & _monailabel_private_names()
    assert touched - declared - OWN_PRIVATES == set(), "declare them in lib/server/patches.py MONAILABEL_INTERNALS"
    assert declared <= touched, "MONAILABEL_INTERNALS names what the app no longer touches"


def test_the_patch_reference_is_generated_from_the_table() -> None:
    text = PATCHES_DOC.read_text(encoding="utf-8")
    assert with_patches(text) == text, "run: .venv/bin/python scripts/reference_docs.py"
