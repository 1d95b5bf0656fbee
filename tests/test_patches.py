"""The app's changes to MONAI Label's server: declared once, applied and checked at start, failing closed.

Each case runs in a fresh interpreter: applying the patches changes MONAI Label's modules for good, and a
simulated upgrade (a patch target that moved) must not leak into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from reference_docs import PATCHES_DOC, with_patches

from conftest import REPO, free_port
from lib.server.patches import PATCHES, TESTED_MONAILABEL_VERSION
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
report = install_all(PatchContext(settings, lambda model, body: None, 4, 5.0, operations, lambda image, source: None))
print("REPORT " + json.dumps(report.as_dict()))
"""


def _install_all(before: str = "") -> subprocess.CompletedProcess:
    code = INSTALL_ALL.format(app_dir=str(APP_DIR), before=textwrap.dedent(before))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(REPO))


def _report(done: subprocess.CompletedProcess) -> dict:
    line = next((x for x in done.stdout.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, (done.stdout + done.stderr)[-3000:]
    return json.loads(line[len("REPORT ") :])


def test_every_patch_says_what_it_replaces_and_why() -> None:
    names = [p.name for p in PATCHES]
    assert len(names) == len(set(names))
    assert all(p.replaces and p.why for p in PATCHES)
    assert {"request_guard", "access_control", "local_datastore_internals"} <= {p.name for p in PATCHES if p.security}


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
def test_a_version_mismatch_is_reported() -> None:
    done = _install_all("import monailabel; monailabel.__version__ = '0.9.0'")
    report = _report(done)
    assert report["monailabel"] == "0.9.0" and report["version_matches"] is False
    assert "MONAI Label 0.9.0 is installed" in done.stderr and f"tested for {TESTED_MONAILABEL_VERSION}" in done.stderr
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
            "local_datastore_internals",
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


def test_the_patch_reference_is_generated_from_the_table() -> None:
    text = PATCHES_DOC.read_text(encoding="utf-8")
    assert with_patches(text) == text, "run: .venv/bin/python scripts/reference_docs.py"
