"""Labels as DICOM SEG: encode a label image against its source series (dcmqi's ``itkimage2segimage``), and
decode a SEG back onto the source image's voxel grid (pydicom-seg, then a nearest-neighbour resample).

Label values 1..n become segment numbers 1..n (``--useLabelIDAsSegmentNumber``); other values are numbered in
order. Each segment's description ends with "(label value N)", which reading takes first; a SEG of another tool
maps a segment to a value by its name (the app's label names), else by its number.
Names and colours come from the save request's ``label_info``, else from the app's label names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

# Distinct colours for label values without one of their own (value 1 first), as RGB 0-255.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]  # fmt: skip
GEOMETRY_TOL_MM = 1e-3


class SegError(ValueError):
    """A label that cannot become a DICOM SEG of its series (the message says why, for the user)."""


@dataclass(frozen=True)
class Segment:
    value: int
    name: str
    color: tuple[int, int, int]


def _color(entry: dict[str, Any], value: int) -> tuple[int, int, int]:
    color = entry.get("color")
    if isinstance(color, (list, tuple)) and len(color) >= 3 and all(isinstance(c, (int, float)) for c in color[:3]):
        rgb = [float(c) for c in color[:3]]
        if all(0.0 <= c <= 1.0 for c in rgb):  # Slicer's 0-1 scale ((1, 0, 0) is red, not near-black)
            rgb = [c * 255.0 for c in rgb]
        return tuple(int(round(min(max(c, 0.0), 255.0))) for c in rgb)  # type: ignore[return-value]
    return PALETTE[(value - 1) % len(PALETTE)]


def segments_for(values: list[int], label_info: Any, label_names: dict[str, int]) -> list[Segment]:
    """A segment per label value. ``label_info`` is what the viewers send on save: a list of
    ``{"name", "idx" (or "id"), "color"}``; an entry without a value applies to the value at its position."""
    by_value: dict[int, dict[str, Any]] = {}
    entries = [e for e in label_info if isinstance(e, dict)] if isinstance(label_info, list) else []
    for position, entry in enumerate(entries):
        value = entry.get("idx", entry.get("id"))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and int(value) == value:
            by_value.setdefault(int(value), entry)
        elif position < len(values):
            by_value.setdefault(values[position], entry)
    names = {v: n for n, v in label_names.items()}
    segments = []
    for value in values:
        entry = by_value.get(value, {})
        name = str(entry.get("name") or names.get(value) or f"label {value}")[:64]
        segments.append(Segment(value, name, _color(entry, value)))
    return segments


def _dcmqi_metadata(segments: list[Segment], series_description: str, creator: str) -> dict[str, Any]:
    attributes = [
        {
            "labelID": s.value,
            "SegmentLabel": s.name,
            "SegmentDescription": f"{s.name} (label value {s.value})",
            "SegmentAlgorithmType": "SEMIAUTOMATIC",
            "SegmentAlgorithmName": "MedSAM2",
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": "91723000",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Anatomical structure",
            },
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": "85756007",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Tissue",
            },
            "recommendedDisplayRGBValue": list(s.color),
        }
        for s in segments
    ]
    return {
        "ContentCreatorName": creator[:64] or "MONAI Label",
        "ClinicalTrialSeriesID": "MedSAM2",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": series_description[:64],
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "segmentAttributes": [attributes],
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": "MedSAM2 label (MONAI Label)",
        "ClinicalTrialCoordinatingCenterName": "MONAI Label",
        "BodyPartExamined": "",
    }


def _tool(name: str) -> str:
    """A dcmqi command: next to this Python (the venv's bin, where the dcmqi wheel puts it), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} (dcmqi) is not installed: pip install dcmqi")
    return found


def label_on_image_grid(label_path: str, image: sitk.Image) -> sitk.Image:
    """The label file as an unsigned integer image on ``image``'s grid; refuses one of another size or place."""
    label = sitk.ReadImage(label_path)
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise SegError("The label has several components per voxel; save it as a labelmap (one value per voxel).")
    if label.GetDimension() != image.GetDimension() or label.GetSize() != image.GetSize():
        raise SegError(f"The label's size {label.GetSize()} is not the image's size {image.GetSize()}.")
    if not np.allclose(label.GetOrigin(), image.GetOrigin(), atol=GEOMETRY_TOL_MM) or not np.allclose(
        label.GetDirection(), image.GetDirection(), atol=1e-4
    ):
        raise SegError("The label is not placed like the image (origin or axis directions differ).")
    arr = sitk.GetArrayFromImage(label)
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise SegError("The label has fractional voxel values; label values must be whole numbers.")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise SegError("Label values must lie between 0 and 65535.")
    out = sitk.GetImageFromArray(arr.astype(np.uint16))
    out.CopyInformation(image)
    return out


def write_dicom_seg(
    label: sitk.Image,
    series_dir: str,
    segments: list[Segment],
    series_description: str = "MedSAM2",
    creator: str = "",
    timeout_s: float = 600.0,
) -> pydicom.Dataset:
    """Encode ``label`` (on the series' grid) as a DICOM SEG referencing the series in ``series_dir``.

    Its SeriesDate/SeriesTime carry the save time to the microsecond: the newest SEG of a series is its label.
    """
    if not segments:
        raise SegError("The label is empty: a DICOM SEG needs at least one labelled voxel.")
    with tempfile.TemporaryDirectory(prefix="medsam2-seg-") as tmp:
        label_file = os.path.join(tmp, "label.nrrd")
        sitk.WriteImage(label, label_file, True)
        meta = os.path.join(tmp, "meta.json")
        Path(meta).write_text(json.dumps(_dcmqi_metadata(segments, series_description, creator)))
        out = os.path.join(tmp, "seg.dcm")
        cmd = [_tool("itkimage2segimage"), "--inputImageList", label_file, "--inputDICOMDirectory", series_dir]
        cmd += ["--outputDICOM", out, "--inputMetadata", meta]
        if [s.value for s in segments] == list(range(1, len(segments) + 1)):
            cmd.append("--useLabelIDAsSegmentNumber")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not os.path.exists(out):
            tail = (done.stdout + done.stderr).strip()[-800:]
            raise RuntimeError(f"itkimage2segimage failed (exit {done.returncode}): {tail}")
        seg = pydicom.dcmread(out)
    now = datetime.now(UTC)
    seg.SeriesDate = seg.ContentDate = now.strftime("%Y%m%d")
    seg.SeriesTime = seg.ContentTime = now.strftime("%H%M%S.%f")
    seg.TimezoneOffsetFromUTC = "+0000"
    return seg


def seg_time_utc(seg: pydicom.Dataset) -> str:
    """When a SEG series was made, as a sortable UTC 'YYYYmmddHHMMSS.ffffff' ('' when it does not say); a time
    without TimezoneOffsetFromUTC is taken as UTC."""
    date, clock = str(seg.get("SeriesDate", "") or ""), str(seg.get("SeriesTime", "") or "")
    if len(date) != 8 or not date.isdigit():
        return ""
    digits, _, fraction = clock.partition(".")
    digits = digits.ljust(6, "0")[:6] if digits.isdigit() else "000000"
    try:
        when = datetime.strptime(date + digits, "%Y%m%d%H%M%S")
    except ValueError:
        return ""
    offset = str(seg.get("TimezoneOffsetFromUTC", "") or "")
    if len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        sign = 1 if offset[0] == "+" else -1
        when -= sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:]))
    micro = fraction[:6].ljust(6, "0") if fraction.isdigit() else "000000"
    return when.strftime("%Y%m%d%H%M%S") + "." + micro


def read_dicom_seg(seg_path: str, image: sitk.Image, label_names: dict[str, int] | None = None) -> sitk.Image:
    """A DICOM SEG file as a uint16 label on ``image``'s voxel grid: a segment gets the value its description
    records (this app's SEGs), else that of its name in ``label_names``, else its segment number."""
    import pydicom_seg

    dataset = pydicom.dcmread(seg_path)
    decoded = pydicom_seg.MultiClassReader().read(dataset).image
    names = label_names or {}

    def value_of(segment: pydicom.Dataset) -> int:
        written = re.search(r"\(label value (\d+)\)$", str(segment.get("SegmentDescription", "")))
        if written:  # written by this app
            return int(written.group(1))
        return names.get(str(segment.SegmentLabel), int(segment.SegmentNumber))

    values = {int(s.SegmentNumber): value_of(s) for s in dataset.SegmentSequence}
    if any(number != value for number, value in values.items()):
        arr = sitk.GetArrayFromImage(decoded)
        lookup = np.arange(max(int(arr.max()), *values) + 1, dtype=np.uint16)
        for number, value in values.items():
            lookup[number] = value
        remapped = sitk.GetImageFromArray(lookup[arr])
        remapped.CopyInformation(decoded)
        decoded = remapped
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(image)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(0)
    resampler.SetOutputPixelType(sitk.sitkUInt16)
    return resampler.Execute(sitk.Cast(decoded, sitk.sitkUInt16))


def referenced_series(seg: pydicom.Dataset) -> str:
    """The SeriesInstanceUID of the image series a SEG was drawn on ('' when it does not say)."""
    try:
        return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError, KeyError, TypeError):
        return ""
