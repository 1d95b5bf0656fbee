"""A local Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``) on 127.0.0.1 with its own storage
folder, started and stopped by PID: the PACS of the demo (``scripts/pacs_demo.py``) and of the tests."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalOrthanc:
    """One Orthanc process with its own storage folder, HTTP (REST + DICOMweb) on 127.0.0.1 only."""

    def __init__(
        self,
        folder: Path,
        http_port: int | None = None,
        name: str = "MEDSAM2-PACS",
        plugins: tuple[str, ...] = (),
        **extra_config: object,
    ):
        self.folder = folder
        self.http_port = http_port or free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.http = requests.Session()  # this object's own requests to Orthanc (headers: its credentials, if any)
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": name,
                    "StorageDirectory": str(folder / "storage"),
                    "IndexDirectory": str(folder / "storage"),
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomServerEnabled": False,
                    "HttpBindAddress": "127.0.0.1",
                    "Plugins": [DICOMWEB_PLUGIN, *plugins],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
                    "StableAge": 1,
                    **extra_config,
                }
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> LocalOrthanc:
        log = open(self.folder / "orthanc.log", "a")
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.http.get(self.url + "/system", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the process by PID (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections are accepted by the kernel but never answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_tail(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through Orthanc's REST API."""
        for f in files:
            r = self.http.post(self.url + "/instances", data=f.read_bytes(), timeout=30)
            r.raise_for_status()

    def series_of_modality(self, modality: str) -> list[dict]:
        """QIDO-RS series search (DICOM JSON)."""
        r = self.http.get(self.dicomweb + "/series", params={"Modality": modality}, timeout=30)
        r.raise_for_status()
        return r.json() if r.content else []

    def instances_of_series(self, series_uid: str) -> list[pydicom.Dataset]:
        """Every instance of a series, read back as pydicom datasets (Orthanc REST)."""
        found = self.http.post(
            self.url + "/tools/find", json={"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}}, timeout=30
        )
        found.raise_for_status()
        out = []
        for instance in found.json():
            r = self.http.get(f"{self.url}/instances/{instance}/file", timeout=30)
            r.raise_for_status()
            with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
                f.write(r.content)
                f.flush()
                out.append(pydicom.dcmread(f.name))
        return out
