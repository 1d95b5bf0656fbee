"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin on loopback, temporary storage, and a CT
series written from the real lung CT of pyradiomics-bhklab's source archive (one DICOM file per slice)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from sam2_testing import APP_DIR

REPO = APP_DIR.parents[1]
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# .ci/run sets this: there a missing Orthanc or Chromium is a failure, not a skip
REQUIRED = os.environ.get("MEDSAM2_REQUIRE_PACS") == "1"


def require(paths: list[str], what: str) -> None:
    """Skip (or fail under .ci/run) when a system package the test needs is not installed."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        message = f"{what} not installed ({', '.join(missing)}); sudo bash scripts/install_pacs_tools.sh"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process with its own storage folder, HTTP (REST + DICOMweb) on 127.0.0.1 only."""

    def __init__(self, folder: Path, http_port: int | None = None):
        require([ORTHANC, DICOMWEB_PLUGIN], "Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb)")
        self.folder = folder
        self.http_port = http_port or free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "MEDSAM2-TEST-PACS",
                    "StorageDirectory": str(folder / "storage"),
                    "IndexDirectory": str(folder / "storage"),
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomServerEnabled": False,
                    "HttpBindAddress": "127.0.0.1",
                    "Plugins": [DICOMWEB_PLUGIN],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
                    "StableAge": 1,
                }
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> Orthanc:
        log = open(self.folder / "orthanc.log", "a")
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.proc.returncode}: {self.log_tail()}")
            try:
                if requests.get(self.url + "/system", timeout=1).ok:
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
            r = requests.post(self.url + "/instances", data=f.read_bytes(), timeout=30)
            r.raise_for_status()

    def series_of_modality(self, modality: str) -> list[dict]:
        """QIDO-RS series search (DICOM JSON)."""
        r = requests.get(self.dicomweb + "/series", params={"Modality": modality}, timeout=30)
        r.raise_for_status()
        return r.json() if r.content else []

    def instances_of_series(self, series_uid: str) -> list[pydicom.Dataset]:
        """Every instance of a series, read back as pydicom datasets (Orthanc REST)."""
        found = requests.post(
            self.url + "/tools/find", json={"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}}, timeout=30
        )
        found.raise_for_status()
        out = []
        for instance in found.json():
            r = requests.get(f"{self.url}/instances/{instance}/file", timeout=30)
            r.raise_for_status()
            with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
                f.write(r.content)
                f.flush()
                out.append(pydicom.dcmread(f.name))
        return out


@dataclass
class CtSeries:
    study_uid: str
    series_uid: str
    files: list[Path]
    image: sitk.Image  # the volume the files encode (LPS geometry, HU)
    ipp: list[tuple[float, float, float]] = field(default_factory=list)  # per file, in file order


def lung_ct(first_slice: int = 18, num_slices: int = 20, size: int = 256) -> sitk.Image:
    """A slab of pyradiomics' lung2 CT (real pixels, HU) through its labelled nodule, in-plane shrunk to ``size``
    (keeps the tests fast; the geometry stays consistent: spacing grows by the same factor)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from prepare_demo import fetch_archive

    archive = fetch_archive(REPO / ".cache" / "demo")
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory() as tmp:
        member = next(m for m in tar.getmembers() if m.name.endswith("data/lung2_image.nrrd"))
        member.name = "lung2_image.nrrd"
        tar.extract(member, tmp, filter="data")
        image = sitk.ReadImage(str(Path(tmp) / member.name))
    image = image[:, :, first_slice : first_slice + num_slices]
    if size and image.GetSize()[0] != size:
        factor = image.GetSize()[0] // size
        image = sitk.BinShrink(image, [factor, factor, 1])
    return sitk.Cast(image, sitk.sitkInt16)


def write_ct_series(
    image: sitk.Image,
    folder: Path,
    patient_id: str = "MEDSAM2-TEST",
    study_uid: str | None = None,
    series_uid: str | None = None,
    head_first_numbering: bool = False,
) -> CtSeries:
    """One CT DICOM file per slice of ``image`` (LPS geometry, HU stored with RescaleIntercept -1024).

    By default InstanceNumber 1 is the slice with the highest z (superior first), the reverse of the voxel order,
    so a reader that sorts by InstanceNumber or by file name instead of ImagePositionPatient gets the volume
    upside down.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    arr = sitk.GetArrayFromImage(image)  # (k, j, i)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    origin = np.array(image.GetOrigin())
    n = arr.shape[0]
    files, ipps = [], []
    for k in range(n):
        ipp = origin + direction[:, 2] * spacing[2] * k
        number = k + 1 if head_first_numbering else n - k
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{number:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName = "MedSAM2^Test"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "MS2-0001"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MedSAM2 test chest CT"
        ds.SeriesDescription = "lung CT (pyradiomics lung2 slab)"
        ds.Modality = "CT"
        ds.Manufacturer = "MedSAM2 tests"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = "CHEST"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.SliceLocation = f"{ipp[2]:.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.KVP = "120"
        ds.PixelData = (np.clip(arr[k].astype(np.int32) + 1024, 0, 65535)).astype(np.uint16).tobytes()
        ds.save_as(str(path), write_like_original=False)
        files.append(path)
        ipps.append(tuple(float(v) for v in ds.ImagePositionPatient))
    return CtSeries(study_uid, series_uid, files, image, ipps)
