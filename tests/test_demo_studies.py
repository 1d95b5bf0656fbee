"""The demo studies (real cases shipped in pyradiomics-bhklab's source archive) and the README's requests
against a real server started on them, as a new user would run them."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from test_server_2d import split_multipart

from conftest import REPO, start_server, stop_server

CASES = {"brain1", "brain2", "breast1", "lung1", "lung2"}


@pytest.fixture(scope="module")
def demo_studies(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "studies"
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_demo.py"), "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("already there") == len(CASES)  # idempotent
    return out


def readme_requests() -> list[tuple[str, dict]]:
    """The curl requests the README shows: (path with query, params)."""
    text = (REPO / "README.md").read_text()
    found = []
    for path, params in re.findall(
        r'curl -X POST "http://127\.0\.0\.1:8000(/infer/[^"]+)".*?-F \'params=(.*?)\'', text, re.S
    ):
        found.append((path, json.loads(params)))
    return found


def test_readme_requests_work_on_the_demo_studies(demo_studies, small_random_conf, tmp_path):
    requests_shown = readme_requests()
    assert len(requests_shown) >= 2
    # what is checked (geometry, coverage, window, slices) does not depend on the model's input size
    server = start_server(demo_studies, small_random_conf, tmp_path / "server.log")
    try:
        info = server.get("/info/").json()
        assert info["datastore"]["total"] == len(CASES)
        lung2 = sitk.ReadImage(str(demo_studies / "lung2.nii.gz"))
        for path, params in requests_shown:
            path = re.sub(r"output=\w+", "output=all", path)
            r = server.post(path, data={"params": json.dumps(params)})
            assert r.status_code == 200, (path, r.text)
            label, result = split_multipart(r)
            assert label.GetSize() == lung2.GetSize()
            assert np.allclose(label.GetOrigin(), lung2.GetOrigin()) and np.allclose(
                label.GetSpacing(), lung2.GetSpacing()
            )
            assert result["window"]["name"] == "abdomen"  # auto window: the image holds HU values
            if "medsam2_2d" in path:
                assert sorted(set(np.nonzero(sitk.GetArrayFromImage(label))[0])) == [result["prompts"][0]["slice"]]
            else:
                roi = params.get("roi")
                expected = roi[5] - roi[4] + 1 if roi else lung2.GetSize()[2]
                assert result["coverage"] and all(
                    c["num_slices_propagated"] == expected for c in result["coverage"].values()
                )
                labelled = np.nonzero(sitk.GetArrayFromImage(label).any(axis=(1, 2)))[0]
                assert labelled.size and (not roi or (labelled.min() >= roi[4] and labelled.max() <= roi[5]))
    finally:
        stop_server(server)
