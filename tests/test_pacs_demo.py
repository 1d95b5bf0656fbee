"""The README's PACS demo (scripts/pacs_demo.py): Orthanc with the demo lung CTs, the app serving them over
DICOMweb; stopping the demo stops both."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import requests
from pacs_testing import DICOMWEB_PLUGIN, ORTHANC, REPO, free_port, require

# scripts/pacs_demo.py starts Orthanc and the server as subprocesses
pytestmark = [pytest.mark.server, pytest.mark.pacs]


def test_pacs_demo_serves_the_demo_series_and_stops_orthanc_with_it(tmp_path):
    require([ORTHANC, DICOMWEB_PLUGIN], "Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb)")
    orthanc_port, port = free_port(), free_port()
    cmd = [sys.executable, str(REPO / "scripts" / "pacs_demo.py"), "--folder", str(tmp_path / "pacs")]
    cmd += ["--orthanc-port", str(orthanc_port), "--port", str(port), "--conf", "checkpoint", "random"]
    log = open(tmp_path / "demo.log", "w")
    demo = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            try:
                if requests.get(url + "/info/", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(1)
        listing = requests.get(url + "/datastore/?output=all", timeout=60).json()["objects"]
        assert len(listing) == 2  # lung1 and lung2, as CT series
        series = requests.get(f"http://127.0.0.1:{orthanc_port}/dicom-web/series", timeout=30).json()
        assert {s["0020000E"]["Value"][0] for s in series} == set(listing)
        assert {s["0008103E"]["Value"][0] for s in series} == {"lung1", "lung2"}
    finally:
        demo.send_signal(signal.SIGTERM)
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
    for probe in (url + "/info/", f"http://127.0.0.1:{orthanc_port}/system"):
        try:
            requests.get(probe, timeout=2)
            raise AssertionError(f"{probe} still answers after the demo stopped")
        except requests.ConnectionError:
            pass
