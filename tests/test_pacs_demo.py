"""The README's first command, ``bash scripts/start_demo.sh``, as a newcomer runs it: the demo studies converted to
DICOM in a local Orthanc started by the script, the app serving them; OHIF's study list (the DICOMweb proxy) shows
them and a box gives a 3D answer. Stopping the demo stops Orthanc with the server.

One demo serves the module (its start converts and uploads the five demo studies): the saved-label tests on
Orthanc (docs/api.md) run on it too, in file order. Ports and the demo folder come from the script's environment
variables; the model is the reference model (no download), passed as the README's offline form passes its
``--conf`` arguments.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from pacs_testing import DICOMWEB_PLUGIN, ORTHANC, REPO, free_port, require

from sam2_testing import REFERENCE_CHECKPOINT, REFERENCE_CONFIG

# the script starts Orthanc and the server as subprocesses: the tests on the demo are marked by hand
DEMO_CASES = {"brain1", "brain2", "breast1", "lung1", "lung2"}
NODULE = {"label": "lesion", "slice": 20, "box": [317, 335, 385, 395]}  # lung2's nodule, demo slices 15-25


@dataclass
class Demo:
    url: str
    orthanc: str
    proc: subprocess.Popen
    log: Path

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 300), **kw)

    def series_uid(self, description: str) -> str:
        found = requests.get(f"{self.orthanc}/dicom-web/series", params={"SeriesDescription": description}, timeout=30)
        return found.json()[0]["0020000E"]["Value"][0]


def wait_until_up(demo: Demo, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert demo.proc.poll() is None, demo.log.read_text()[-3000:]
        try:
            if demo.get("/info/", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"the demo did not answer within {timeout_s}s:\n{demo.log.read_text()[-3000:]}")


def stop(demo: Demo) -> None:
    demo.proc.send_signal(signal.SIGTERM)
    try:
        demo.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        demo.proc.kill()
        raise


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Demo]:
    """``bash scripts/start_demo.sh --conf ...`` with its ports and demo folder set through its environment."""
    require([ORTHANC, DICOMWEB_PLUGIN], "Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb)")
    tmp = tmp_path_factory.mktemp("start_demo")
    port, orthanc_port = free_port(), free_port()
    env = {**os.environ, "MEDSAM2_PORT": str(port), "MEDSAM2_ORTHANC_PORT": str(orthanc_port)}
    env["MEDSAM2_DEMO_DIR"] = str(tmp / "demo")
    conf = {"checkpoint": REFERENCE_CHECKPOINT, "model_config": REFERENCE_CONFIG, "warm_up": "off"}
    conf |= {"cpu_encoder": "torch", "finetuned_checkpoint": tmp / "finetuned.pt"}
    args = [a for k, v in conf.items() for a in ("--conf", k, str(v))]
    log = tmp / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "scripts/start_demo.sh", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)
        )
    started = Demo(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{orthanc_port}", proc, log)
    try:
        wait_until_up(started, 600)
        yield started
    finally:
        stop(started)


@pytest.mark.server
@pytest.mark.pacs
def test_start_demo_lists_the_demo_studies_in_ohif_and_a_box_gives_a_3d_answer(demo):
    assert "no local PACS" not in demo.log.read_text()
    assert demo.get("/ohif/").status_code == 200
    # OHIF's study list asks the PACS through the server's DICOMweb proxy
    studies = demo.get("/proxy/dicom/qido/studies").json()
    assert {s["00100020"]["Value"][0] for s in studies} >= {"MEDSAM2-DEMO-1", "MEDSAM2-DEMO-2"}
    assert len(studies) == len(DEMO_CASES)
    listing = demo.get("/datastore/?output=all").json()["objects"]
    assert len(listing) == len(DEMO_CASES)  # CT and MR series, each an image of the app
    lung2 = demo.series_uid("lung2")
    params = {"prompts": [NODULE], "slice_range": [15, 25]}
    r = demo.post(f"/infer/medsam2_3d?image={lung2}&output=json", data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text
    coverage = r.json()["coverage"]["lesion"]
    assert coverage["num_slices_with_mask"] >= 5, coverage


@pytest.mark.server
@pytest.mark.pacs
@pytest.mark.browser
def test_start_demo_in_a_browser_the_study_list_then_a_box_on_lung2_gives_a_3d_overlay(demo, tmp_path):
    """The README's first command, then Chromium: OHIF's study list shows the demo studies; lung2 opened in the
    MedSAM2 mode, a box dragged around its nodule on slice 20 (real mouse input) comes back as a 3D overlay."""
    from browser_testing import (
        chromium,
        click_panel,
        drag_voxels,
        open_medsam2_study,
        panel_labelmap,
        panel_state,
        screenshot,
        shows_slice,
        wait_for,
    )
    from pacs_testing import CHROMEDRIVER, CHROMIUM

    require([CHROMIUM, CHROMEDRIVER], "Chromium and chromedriver (Debian chromium, chromium-driver)")
    patients = {s["00100020"]["Value"][0] for s in demo.get("/proxy/dicom/qido/studies").json()}
    lung2 = demo.series_uid("lung2")
    series = requests.get(f"{demo.orthanc}/dicom-web/series", params={"SeriesDescription": "lung2"}, timeout=30)
    study = series.json()[0]["0020000D"]["Value"][0]
    (tmp_path / "lung2.nii.gz").write_bytes(demo.get(f"/datastore/image?image={lung2}").content)
    image = sitk.ReadImage(str(tmp_path / "lung2.nii.gz"))  # the geometry the server and the PACS share
    with chromium(tmp_path / "chromedriver.log") as driver:
        driver.get(f"{demo.url}/ohif/")
        wait_for(lambda: all(p in driver.page_source for p in patients), 120, f"the demo studies {sorted(patients)}")
        open_medsam2_study(driver, demo.url, study, NODULE["slice"])
        for name in ("3d", "foreground", "tool-box"):
            click_panel(driver, name)
        wait_for(lambda: panel_state(driver, "tool") == "box", 5, "the box tool")
        assert shows_slice(driver, image, NODULE["slice"])
        x0, y0, x1, y1 = NODULE["box"]
        drag_voxels(driver, image, [(x0, y0), ((x0 + x1) / 2, (y0 + y1) / 2), (x1, y1)], NODULE["slice"])
        click_panel(driver, "run")
        wait_for(lambda: panel_state(driver, "lastRun") is not None and not panel_state(driver, "busy"), 300, "3D")
        assert panel_state(driver, "error") is None, panel_state(driver, "error")
        overlay = wait_for(lambda: (m := panel_labelmap(driver, image)) is not None and m.any() and m, 60, "overlay")
        screenshot(driver, tmp_path / "demo_box_3d.png")
    request = panel_request(demo)
    assert request["image"] == lung2 and request["prompts"][0]["slice"] == NODULE["slice"]
    assert np.abs(np.array(request["prompts"][0]["box"]) - np.array(NODULE["box"])).max() <= 1, request
    replay = {"prompts": request["prompts"], "client_id": "replay", "result_extension": ".nii.gz"}
    r = demo.post(f"/infer/medsam2_3d?image={lung2}&output=image", data={"params": json.dumps(replay)})
    assert r.status_code == 200, r.text[:500]
    (tmp_path / "answer.nii.gz").write_bytes(r.content)
    assert np.array_equal(overlay, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "answer.nii.gz"))))
    assert np.count_nonzero(overlay.any(axis=(1, 2))) > 1  # propagated beyond the key slice
    # the reference model (generated volumes, never a CT) spills outside the box on lung2; the box's own area is
    # mostly covered
    inside = overlay[NODULE["slice"], y0:y1, x0:x1] > 0
    assert inside.mean() > 0.3, inside.mean()


def panel_request(demo: Demo) -> dict:
    """The last 3D request an OHIF panel sent (MONAI Label logs each request's params)."""
    lines = [line for line in demo.log.read_text().splitlines() if "Infer Request: " in line and "'ohif-" in line]
    return ast.literal_eval(lines[-1].split("Infer Request: ", 1)[1])


def put_final_label(demo: Demo, image_id: str, image: sitk.Image, value: int, path: Path, shift: int = 0) -> None:
    """Save a final label (a box of ``value`` on slices 8-10) as OHIF's panel does: PUT /datastore/label."""
    arr = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    arr[8:11, 100 + shift : 140 + shift, 100:150] = value
    label = sitk.GetImageFromArray(arr)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(path))
    with open(path, "rb") as f:
        r = requests.put(
            f"{demo.url}/datastore/label?image={image_id}&tag=final", files={"label": (path.name, f)}, timeout=300
        )
    assert r.status_code == 200, r.text


@pytest.mark.server
@pytest.mark.pacs
def test_saved_labels_on_orthanc_each_save_a_new_seg_series_and_any_one_refined(demo, tmp_path):
    """docs/api.md next to a PACS: a name added to an image, two saves as two SEG series, the older refined."""
    brain1, brain2 = demo.series_uid("brain1"), demo.series_uid("brain2")
    added = demo.post(f"/medsam2/labels/{brain2}/names", json={"name": "oedema (left)"})
    assert added.status_code == 200, added.text
    assert demo.post(f"/medsam2/labels/{brain2}/names", json={"name": "oedema/left"}).status_code == 422
    value = demo.get("/info/").json()["label_names"]["added"]["oedema (left)"]
    assert demo.get(f"/medsam2/labels/{brain2}").json()["saved"] == []

    (tmp_path / "brain2.nii.gz").write_bytes(demo.get(f"/datastore/image?image={brain2}").content)
    image = sitk.ReadImage(str(tmp_path / "brain2.nii.gz"))
    put_final_label(demo, brain2, image, value, tmp_path / "first.nii.gz")
    put_final_label(demo, brain2, image, value, tmp_path / "second.nii.gz", shift=20)
    listed = demo.get(f"/medsam2/labels/{brain2}").json()
    assert listed["names"][-1] == "oedema (left)"
    saved = listed["saved"]
    assert [(s["tag"], s["version"], s["source"], s["names"]) for s in saved] == [
        ("final", 2, "pacs", ["oedema (left)"]),
        ("final", 1, "pacs", ["oedema (left)"]),
    ]
    segs = requests.get(f"{demo.orthanc}/dicom-web/series", params={"Modality": "SEG"}, timeout=30).json()
    assert {s["0020000E"]["Value"][0] for s in segs} == {s["series_uid"] for s in saved}  # both kept in the PACS
    assert all(s["refine_from"] == f"seg:{s['series_uid']}" for s in saved)

    prompt = {"label": "oedema (left)", "slice": 9, "box": [100, 100, 150, 140]}
    params = {"prompts": [prompt], "refine_from": saved[1]["refine_from"], "slice_range": [8, 10]}
    r = demo.post(f"/infer/medsam2_3d?image={brain2}&output=json", data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text
    assert r.json()["label_names"]["oedema (left)"] == value

    # a SEG of brain2 to refine brain1: 422 naming both grids
    r = demo.post(f"/infer/medsam2_3d?image={brain1}&output=json", data={"params": json.dumps(params)})
    assert r.status_code == 422, r.text
    assert "256x256x23 voxels" in r.json()["detail"] and "256x256x25 voxels" in r.json()["detail"], r.text


@pytest.mark.server
@pytest.mark.pacs
def test_stopping_the_demo_stops_orthanc_too(demo):
    stop(demo)
    for probe in (demo.url + "/info/", demo.orthanc + "/system"):
        with pytest.raises(requests.ConnectionError):
            requests.get(probe, timeout=2)


def test_without_root_the_pacs_install_fails_with_one_line_and_changes_nothing(tmp_path):
    """What start_demo.sh shows before falling back to the studies folder (not root, no sudo, Orthanc missing)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in {"id": "echo 1000", "sudo": "exit 1", "dpkg-query": "exit 1", "apt-get": "exit 99"}.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "scripts/install_pacs_tools.sh", "--pacs-only"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "install_pacs_tools: orthanc orthanc-dicomweb not installed: needs root (or password-less sudo)"
    ]
    script = (REPO / "scripts" / "start_demo.sh").read_text()
    assert "no local PACS (${why#install_pacs_tools: })" in script  # the one line start_demo.sh prints from it


def test_a_port_taken_by_another_orthanc_is_named_before_anything_is_converted(tmp_path):
    require([ORTHANC, DICOMWEB_PLUGIN], "Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "scripts/pacs_demo.py", "--orthanc-port", str(port), "--studies", str(tmp_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1 and f"port {port} is in use" in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # nothing prepared or converted
