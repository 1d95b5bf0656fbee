"""Every route and method MONAI Label mounts, tried as a new user would: unknown ids, models, strategies and
scoring methods, hostile query values and bodies. Each answer is a 2xx or a 4xx whose ``detail`` says what to
change; never a 5xx, a hang or a dead server, and what was saved stays saved.

The routes are not listed by hand: they are read from MONAI Label's FastAPI app (hidden ones too) and from the
running server's OpenAPI description, so a route added by an upgrade is tried too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import requests
from route_listing import ROUTE_LISTER

from conftest import start_server, stop_server, write_image
from sam2_testing import blob_volume

pytestmark = pytest.mark.server

# Routes that reach outside this machine on purpose, or stop what the test stands on.
NOT_TRIED = {
    "/proxy/dicom/{op}/{path:path}": "forwards to the DICOMweb server (none here); tests/test_pacs.py covers it",
    "/proxy/dicom/{path:path}": "forwards to the DICOMweb server (none here); tests/test_pacs.py covers it",
    "/proxy/dicom/wado/{path:path}": "forwards to the DICOMweb server (none here); tests/test_pacs.py covers it",
    "/proxy/dicom/qido/{path:path}": "forwards to the DICOMweb server (none here); tests/test_pacs.py covers it",
    "/proxy/dicom/stow/{path:path}": "forwards to the DICOMweb server (none here); tests/test_pacs.py covers it",
    "/logs/gpu": "asks the GPU driver (nvidia-smi) of the host; there is none here",
    "/reload": "re-creates the app; tests/test_auth.py covers it",
}
UNKNOWN = "no-such-id"
HOSTILE_QUERIES = [
    {},
    {"image": UNKNOWN, "label": UNKNOWN, "id": UNKNOWN, "tag": "final", "model": UNKNOWN},
    {"image": "../../etc/passwd", "id": "..", "tag": "../x", "label": "%00", "params": "{not json"},
    {"output": "bogus", "limit_cases": "-1", "images": "bogus", "run_sync": "maybe", "check_sum": "x" * 300},
]
BODIES = [None, b"{not json", json.dumps({"unexpected": [1, {"deep": None}]}).encode(), b"\x00\xff" * 64]


@pytest.fixture(scope="module")
def route_server(tmp_path_factory, random_checkpoint):
    """A server of its own (these requests delete and re-save labels), with one image and its final label."""
    root = tmp_path_factory.mktemp("route_fuzz")
    studies = root / "studies"
    studies.mkdir()
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    write_image(blob_volume((8, 48, 48), radius=8.0), studies / "kept.nii.gz", (1.0, 1.0, 2.0), (0, 0, 0), direction)
    label = (blob_volume((8, 48, 48), radius=8.0) > 0).astype(np.uint8)
    write_image(label, root / "kept_label.nii.gz", (1.0, 1.0, 2.0), (0, 0, 0), direction)
    server = start_server(studies, {"checkpoint": str(random_checkpoint), "window": "0,255"}, root / "server.log")
    with open(root / "kept_label.nii.gz", "rb") as f:
        saved = requests.put(
            server.url + "/datastore/label?image=kept&tag=final", files={"label": ("kept.nii.gz", f)}, timeout=60
        )
    assert saved.status_code == 200, saved.text
    yield server
    stop_server(server)


def every_route(server) -> list[tuple[str, str]]:
    listed = subprocess.run([sys.executable, "-c", ROUTE_LISTER], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-3000:]
    found = {
        (method, r["path"])
        for r in json.loads(listed.stdout.strip().splitlines()[-1])
        if not r.get("mount")
        for method in r["methods"]
    }
    schema = requests.get(server.url + "/openapi.json", timeout=30).json()
    found |= {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    head_routes = ("/datastore/image", "/datastore/label")  # HEAD is otherwise FastAPI's automatic twin of GET
    return sorted((m, p) for m, p in found if p not in NOT_TRIED and (m != "HEAD" or p in head_routes))


def bodies_for(method: str, path: str) -> list[bytes | None]:
    """Request bodies to try; no empty body to ``POST /train/``: that is a valid request to start training."""
    if method not in ("POST", "PUT"):
        return [None]
    return BODIES[1:] if path.startswith("/train") else BODIES


def with_unknowns(path: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", UNKNOWN, path)


def answer_problem(answer: requests.Response, what: str) -> str | None:
    """Why ``answer`` is not a 2xx/3xx or a 4xx with a detail, else None."""
    if answer.status_code >= 500:
        return f"{what}: {answer.status_code} {answer.text[:300]}"
    if answer.status_code >= 400 and answer.request.method != "HEAD":
        try:
            detail = answer.json().get("detail")
        except ValueError:
            detail = None
        if not detail:
            return f"{what}: {answer.status_code} without a detail: {answer.text[:300]}"
    return None


def test_every_route_answers_unknown_and_hostile_input_with_2xx_or_a_clear_4xx(route_server) -> None:
    routes = every_route(route_server)
    assert len(routes) > 40 and ("DELETE", "/datastore/") in routes and ("POST", "/batch/infer/{model}") in routes
    tried, problems = 0, []
    for method, path in routes:
        for query in HOSTILE_QUERIES:
            for body in bodies_for(method, path):
                what = f"{method} {with_unknowns(path)} {query} body={body!r:.40}"
                headers = {"Content-Type": "application/json"} if body else {}
                answer = requests.request(
                    method,
                    route_server.url + with_unknowns(path),
                    params=query,
                    data=body,
                    headers=headers,
                    timeout=60,
                )
                problems.append(answer_problem(answer, what))
                tried += 1
        assert route_server.alive(), f"the server died after {method} {path}"
    print(f"\nroutes tried: {len(routes)}, requests: {tried}")
    problems = [p for p in problems if p]
    assert not problems, f"{len(problems)} bad answers:\n" + "\n".join(problems)
    kept = requests.get(route_server.url + "/datastore/label?label=kept&tag=final", timeout=60)
    assert kept.status_code == 200 and len(kept.content) > 100, "the saved label was lost"


@pytest.mark.parametrize(
    ("method", "path", "status", "says"),
    [
        ("DELETE", f"/datastore/?id={UNKNOWN}", 404, "not found"),
        ("PUT", f"/datastore/updatelabelinfo?label={UNKNOWN}&tag=final", 404, "not found"),
        ("POST", f"/activelearning/{UNKNOWN}", 404, "Unknown active-learning strategy"),
        ("POST", f"/scoring/{UNKNOWN}", 404, "Unknown scoring method"),
        ("POST", "/batch/infer/medsam2_3d", 422, "interactive model"),
        ("POST", "/batch/infer/medsam2_2d", 422, "interactive model"),
        ("POST", f"/batch/infer/{UNKNOWN}", 404, "Unknown model"),
        ("POST", "/infer/wsi/medsam2_2d", 404, "No whole-slide model"),
    ],
)
def test_what_monailabel_answered_with_500_is_a_clear_4xx(route_server, method, path, status, says) -> None:
    answer = requests.request(method, route_server.url + path, timeout=60)
    assert answer.status_code == status, answer.text[:500]
    assert says.lower() in answer.json()["detail"].lower()
    running = requests.get(route_server.url + "/batch/infer/?check_if_running=true", timeout=30)
    assert running.status_code != 200 or not running.json().get("running"), "a batch process was started"
