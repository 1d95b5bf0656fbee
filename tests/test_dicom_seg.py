"""Labels <-> DICOM SEG without a PACS: values, names and colours survive, newest-SEG times compare across time
zones, and labels that cannot be a SEG of their series are refused with a reason."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lib.imaging.dicom_seg import (
    SegError,
    label_on_image_grid,
    read_dicom_seg,
    seg_time_utc,
    segments_for,
    write_dicom_seg,
)
from sam2_testing import APP_DIR, blob_volume

sys.path.insert(0, str(APP_DIR.parents[1] / "scripts"))
from dicom_series import write_ct_series  # noqa: E402


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    image = sitk.GetImageFromArray(blob_volume((12, 40, 48)))
    image.SetSpacing((0.8, 0.8, 3.0))
    image.SetOrigin((-20.0, 10.0, 55.0))
    write_ct_series(image, folder / "ct")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "ct")))
    return folder, reader.Execute()


def test_values_names_and_colours_survive_a_round_trip(series, tmp_path):
    folder, image = series
    arr = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    arr[2:6, 10:20, 12:30] = 1
    arr[8:10, 25:35, 5:15] = 5  # not 1..n: numbered 2 in the SEG, value kept in the description
    label = sitk.GetImageFromArray(arr)
    label.CopyInformation(image)
    info = [{"name": "tumour", "idx": 1, "color": [1.0, 0.0, 0.0]}, {"name": "cyst", "idx": 5, "color": [0, 0, 255]}]
    segments = segments_for([1, 5], info, {"lesion": 1})
    assert [(s.value, s.name, s.color) for s in segments] == [(1, "tumour", (255, 0, 0)), (5, "cyst", (0, 0, 255))]
    seg = write_dicom_seg(label_on_image_grid(_write(label, tmp_path), image), str(folder / "ct"), segments)
    path = tmp_path / "seg.dcm"
    seg.save_as(str(path))
    assert [str(s.SegmentLabel) for s in pydicom.dcmread(str(path)).SegmentSequence] == ["tumour", "cyst"]
    back = read_dicom_seg(str(path), image, {"lesion": 1})  # names unknown to the app: values from the SEG
    assert np.array_equal(sitk.GetArrayFromImage(back), arr)
    assert seg.TimezoneOffsetFromUTC == "+0000" and len(seg_time_utc(seg)) == 21


def _write(label: sitk.Image, folder: Path) -> str:
    path = folder / "label.nii.gz"
    sitk.WriteImage(label, str(path))
    return str(path)


def test_labels_that_cannot_be_a_seg_of_the_series_are_refused(series, tmp_path):
    folder, image = series
    small = sitk.Image([10, 10, 4], sitk.sitkUInt8)
    with pytest.raises(SegError, match="size"):
        label_on_image_grid(_write(small, tmp_path), image)
    moved = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    moved.CopyInformation(image)
    moved.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(SegError, match="placed"):
        label_on_image_grid(_write(moved, tmp_path), image)
    with pytest.raises(SegError, match="empty"):
        write_dicom_seg(label_on_image_grid(_write(sitk.Image(image) * 0, tmp_path), image), str(folder), [])


@pytest.mark.parametrize(
    ("date", "time_", "offset", "expected"),
    [
        ("20261126", "101500.25", "+0100", "20261126091500.250000"),
        ("20261126", "091500", "", "20261126091500.000000"),
        ("20261126", "0915", "-0230", "20261126114500.000000"),
        ("2026112", "091500", "", ""),
    ],
)
def test_seg_times_compare_in_utc(date, time_, offset, expected):
    ds = pydicom.Dataset()
    ds.SeriesDate, ds.SeriesTime = date, time_
    if offset:
        ds.TimezoneOffsetFromUTC = offset
    assert seg_time_utc(ds) == expected
