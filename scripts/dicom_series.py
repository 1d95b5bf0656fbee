"""Write a volume as a CT (or MR) DICOM series, one file per slice, with consistent geometry (what a scanner sends
a PACS): used by the PACS demo (``scripts/pacs_demo.py``) and the PACS tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


@dataclass
class CtSeries:
    study_uid: str
    series_uid: str
    files: list[Path]
    image: sitk.Image  # the volume the files encode (LPS geometry, HU)
    ipp: list[tuple[float, float, float]] = field(default_factory=list)  # per file, in file order


def write_ct_series(
    image: sitk.Image,
    folder: Path,
    patient_id: str = "MEDSAM2-TEST",
    study_uid: str | None = None,
    series_uid: str | None = None,
    head_first_numbering: bool = False,
    uid_seed: str | None = None,
    description: str = "lung CT (pyradiomics lung2 slab)",
    modality: str = "CT",
) -> CtSeries:
    """One CT DICOM file per slice of ``image`` (LPS geometry, HU stored with RescaleIntercept -1024); with
    ``modality="MR"`` an MR series (values stored as they are, rounded, RescaleIntercept 0).

    ``uid_seed``: derive the UIDs from it (re-running writes the same instances). By default InstanceNumber 1
    is the slice with the highest z (superior first), the reverse of the voxel order, so a reader that sorts by
    InstanceNumber or by file name instead of ImagePositionPatient gets the volume upside down.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def uid(*parts: str) -> str:  # with a seed, the same files get the same UIDs on every run
        return generate_uid(entropy_srcs=[uid_seed, *parts]) if uid_seed else generate_uid()

    study_uid = study_uid or uid("study")
    series_uid = series_uid or uid("series")
    frame_uid = uid("frame")
    arr = sitk.GetArrayFromImage(image)  # (k, j, i)
    sop_class, intercept = (MRImageStorage, 0) if modality == "MR" else (CTImageStorage, -1024)
    stored = np.clip(np.round(arr).astype(np.int64) - intercept, 0, 65535).astype(np.uint16)
    window = np.percentile(arr, [0.5, 99.5]) if modality == "MR" else (-1350.0, 150.0)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    origin = np.array(image.GetOrigin())
    n = arr.shape[0]
    files, ipps = [], []
    for k in range(n):
        ipp = origin + direction[:, 2] * spacing[2] * k
        number = k + 1 if head_first_numbering else n - k
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = uid("instance", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{number:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName = "Doe^Jane"  # a placeholder: the log scrubber hides its parts wherever they appear
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
        ds.StudyDescription = f"MedSAM2 {description}" if modality == "MR" else "MedSAM2 test chest CT"
        ds.SeriesDescription = description
        ds.Modality = modality
        ds.Manufacturer = "MedSAM2 tests"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = "CHEST" if modality == "CT" else ""
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
        ds.RescaleIntercept = str(intercept)
        ds.RescaleSlope = "1"
        ds.WindowCenter = f"{(window[0] + window[1]) / 2:.1f}"
        ds.WindowWidth = f"{max(window[1] - window[0], 1.0):.1f}"
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = "120"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(str(path), write_like_original=False)
        files.append(path)
        ipps.append(tuple(float(v) for v in ds.ImagePositionPatient))
    return CtSeries(study_uid, series_uid, files, image, ipps)
