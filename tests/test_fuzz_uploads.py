"""Broken, hostile, odd and too-large uploads and images: a clear 4xx before anything is decoded that need not be;
real images still work."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from fuzz_testing import (
    CASES,
    FUZZ,
    SERVED_TIMEOUT_S,
    assert_refused,
    check_alive,
    infer,
    post,
)
from hypothesis import example, given
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from test_cine import real_ultrasound_loop, write_multiframe_dicom

from conftest import start_server, stop_server


def _volume_bytes(suffix: str, shape_kji=(6, 32, 32)) -> bytes:
    """A small valid int16 volume written (uncompressed unless .gz) as ``suffix``."""
    image = sitk.GetImageFromArray((np.arange(np.prod(shape_kji)) % 200).reshape(shape_kji).astype(np.int16))
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz_{os.getpid()}{suffix}"
    sitk.WriteImage(image, str(path), useCompression=suffix.endswith(".gz"))
    data = path.read_bytes()
    path.unlink()
    return data


def huge_header_nifti(dims=(2000, 2000, 2000)) -> bytes:
    """A NIfTI-1 header declaring ``dims`` (int16 voxels) followed by a few bytes of data: a header check
    refuses it (413); decoding it would fail (truncated) or allocate gigabytes."""
    raw = bytearray(_volume_bytes(".nii", (2, 4, 4)))
    struct.pack_into("<8h", raw, 40, 3, *dims, 1, 1, 1, 1)
    return bytes(raw[:400])


def huge_header_nrrd(sizes=(100_000, 100_000, 100_000)) -> bytes:
    header = f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {' '.join(map(str, sizes))}\nencoding: raw\n\n"
    return header.encode() + b"\x00" * 64


def _dicom_bytes(kind: str) -> bytes:
    if kind == "ct":
        return Path(get_testdata_file("CT_small.dcm")).read_bytes()
    if kind == "mr":
        return Path(get_testdata_file("MR_small.dcm")).read_bytes()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz_cine_{os.getpid()}.dcm"
    write_multiframe_dicom(path, real_ultrasound_loop(), "RGB", FrameTime=20.0)
    data = path.read_bytes()
    path.unlink()
    return data


SOURCES: dict[str, bytes] = {}


def source(kind: str) -> bytes:
    if kind not in SOURCES:
        SOURCES[kind] = {
            "nii_gz": lambda: _volume_bytes(".nii.gz"),
            "nii": lambda: _volume_bytes(".nii"),
            "nrrd": lambda: _volume_bytes(".nrrd"),
            "mha": lambda: _volume_bytes(".mha"),
            "dcm_ct": lambda: _dicom_bytes("ct"),
            "dcm_mr": lambda: _dicom_bytes("mr"),
            "dcm_cine": lambda: _dicom_bytes("cine"),
        }[kind]()
    return SOURCES[kind]


SUFFIX = {
    "nii_gz": ".nii.gz",
    "nii": ".nii",
    "nrrd": ".nrrd",
    "mha": ".mha",
    "dcm_ct": ".dcm",
    "dcm_mr": ".dcm",
    "dcm_cine": ".dcm",
}
NOT_IMAGES = {
    "empty.nii.gz": b"",
    "empty.dcm": b"",
    "passwd.nii.gz": b"root:x:0:0:root:/root:/bin/bash\n",
    "report.pdf.dcm": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
    "archive.nii.gz": b"PK\x03\x04" + b"\x00" * 200,
    "program.nrrd": b"\x7fELF\x02\x01\x01" + b"\x00" * 500,
    "page.mha": b"<html><body>not an image</body></html>",
    "gzip_of_text.nii.gz": gzip.compress(b"hello world " * 100),
    "bogus.mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4,
    "huge.nii": huge_header_nifti(),
    "huge.nrrd": huge_header_nrrd(),
    "overflow.nrrd": huge_header_nrrd((2**40, 2**40, 2**40)),
    "zeros.nii": b"\x00" * (8 << 20),
}
HOSTILE_NAMES = [
    "../../../../tmp/evil{suffix}",
    "/etc/passwd{suffix}",
    "..\\..\\evil{suffix}",
    "a" * 300 + "{suffix}",
    "x." + "z" * 300,
    "scan{suffix}\x00.sh",
    "scan.%2e%2e%2f{suffix}",
    "{suffix}",
    "scan.tar.gz.zip.exe.sh.py{suffix}",
]


@st.composite
def broken_upload(draw) -> tuple[str, bytes]:
    """(file name, bytes): a truncated NIfTI/DICOM, a file that is no image, or a header far over the limits."""
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(NOT_IMAGES)))
        data = NOT_IMAGES[name]
        if draw(st.booleans()) and data:
            data = data + draw(st.binary(max_size=64))
        suffix = "".join(Path(name).suffixes[-2:]) if name.endswith(".nii.gz") else Path(name).suffix
    else:
        kind = draw(st.sampled_from(sorted(SUFFIX)))
        full = source(kind)
        cut = draw(st.integers(0, len(full) - 1))
        data = full[:cut]
        if draw(st.booleans()):  # damaged rather than cut: random bytes over the pixel data
            data = full[: len(full) // 2] + draw(st.binary(min_size=1, max_size=256))
        name, suffix = "scan" + SUFFIX[kind], SUFFIX[kind]
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(HOSTILE_NAMES)).format(suffix=suffix)
    return name, data


@FUZZ
@given(upload=broken_upload(), model=st.sampled_from(["medsam2_2d", "medsam2_3d"]))
@example(upload=("huge.nii", huge_header_nifti()), model="medsam2_2d")
@example(upload=("scan.nii", _volume_bytes(".nii")[:348]), model="medsam2_2d")
@example(upload=("scan.nii", _volume_bytes(".nii")[:-1]), model="medsam2_3d")
@example(upload=("overflow.nrrd", huge_header_nrrd((2**40, 2**40, 2**40))), model="medsam2_2d")
@example(upload=("scan.nii.gz\x00.sh", b"\x00" * 10), model="medsam2_2d")
@example(upload=("x." + "z" * 300, b"\x00" * 10), model="medsam2_2d")
def test_broken_uploads_are_refused(fuzz_server, upload, model):
    name, data = upload
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 1, 1], "slice": 1}
    r = post(
        fuzz_server,
        f"/infer/{model}?output=json",
        "uploads",
        data={"params": json.dumps(params)},
        files={"file": (name, io.BytesIO(data), "application/octet-stream")},
    )
    detail = assert_refused(r, (name[:80], len(data)))
    assert "root:" not in detail
    if name in ("huge.nii", "huge.nrrd"):  # refused from the header (decoding would need terabytes)
        assert r.status_code == 413 and "max_voxels" in detail, detail
    if name == "overflow.nrrd":  # sizes whose product overflows 64 bits: ITK refuses the header
        assert r.status_code in (413, 415), detail


def test_uploads_of_real_images_still_work(fuzz_server):
    """The upload checks keep real files usable (also with an odd file name)."""
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 1, 1], "slice": 1}
    for name in ("scan.nii.gz", "../../odd name.v2.nii.gz"):
        r = post(
            fuzz_server,
            "/infer/medsam2_2d?output=json",
            "uploads",
            timeout=SERVED_TIMEOUT_S,
            data={"params": json.dumps(params)},
            files={"file": (name, io.BytesIO(source("nii_gz")), "application/octet-stream")},
        )
        assert r.status_code == 200, r.text
        assert r.json()["image"]["shape_ijk"] == [32, 32, 6]
    check_alive(fuzz_server)


def _image_bytes(array: np.ndarray, suffix: str = ".nii.gz", vector: bool = False) -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz_odd_{os.getpid()}{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    data = path.read_bytes()
    path.unlink()
    return data


# name: (array (k, j, i) or (j, i, channels), vector image, models to ask). Each request encodes at least one
# slice, so the 3D model is asked only where it refuses at once (a single slice) or has two slices to track.
ODD_IMAGES = {
    "one voxel": (np.ones((1, 1, 1), np.int16), False, ("medsam2_2d", "medsam2_3d")),
    "a line, 1 x 300 x 1": (np.arange(300, dtype=np.int16).reshape(1, 300, 1), False, ("medsam2_3d",)),
    "two slices of 2 x 2": (np.arange(8, dtype=np.int16).reshape(2, 2, 2), False, ("medsam2_3d",)),
    "NaN and Inf voxels": (np.array([[[np.nan, np.inf], [-np.inf, 1.0]]] * 3, np.float32), False, ("medsam2_2d",)),
    "int64 extremes": (
        np.array([[[np.iinfo(np.int64).min, np.iinfo(np.int64).max]] * 2] * 2),
        False,
        ("medsam2_2d",),
    ),
    "colour 2D": (np.full((8, 8, 3), 200, np.uint8), True, ("medsam2_2d",)),
}


@pytest.mark.parametrize("what", sorted(ODD_IMAGES))
def test_odd_but_readable_images_never_crash_the_server(fuzz_server, what):
    """Tiny, non-finite, extreme or colour images with an in-range click: served or a 4xx, never a 500."""
    array, vector, models = ODD_IMAGES[what]
    for model in models:
        params = {"label": "lesion", "foreground": [[0, 0, 0]], "slice": 0}
        r = post(
            fuzz_server,
            f"/infer/{model}?output=json",
            "odd_images",
            timeout=SERVED_TIMEOUT_S,
            data={"params": json.dumps(params)},
            files={"file": ("odd.nii.gz", io.BytesIO(_image_bytes(array, vector=vector)), "application/octet-stream")},
        )
        assert r.status_code == 200 or 400 <= r.status_code < 500, (what, model, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert_refused(r, (what, model))
    check_alive(fuzz_server)


# ------------------------------------------------------------------------------------------------- /train


@pytest.fixture(scope="module")
def small_limit_server(studies, random_checkpoint, tmp_path_factory):
    """A server whose --conf max_voxels is below ct_blob's 122,880 voxels (xray_2d's 4,096 fit)."""
    log = tmp_path_factory.mktemp("logs_small") / "server.log"
    srv = start_server(studies, {"checkpoint": str(random_checkpoint), "max_voxels": "100000"}, log)
    yield srv
    stop_server(srv)


def test_volume_over_max_voxels_is_refused_up_front(small_limit_server):
    srv = small_limit_server
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 3, 3], "slice": 3}
    for model in ("medsam2_2d", "medsam2_3d"):
        r = infer(srv, model, params, "memory", image="ct_blob", timeout=SERVED_TIMEOUT_S)  # the first builds the model
        detail = assert_refused(r, model, statuses=(413,))
        assert "122,880" in detail and "100,000" in detail and "--conf max_voxels" in detail, detail
    # refused from the header, before decoding: this file's pixel data is missing, so decoding would answer 415
    truncated = huge_header_nifti((50, 50, 50))
    r = post(
        srv,
        "/infer/medsam2_2d?output=json",
        "memory",
        data={"params": json.dumps(params)},
        files={"file": ("big.nii", io.BytesIO(truncated), "application/octet-stream")},
    )
    detail = assert_refused(r, "truncated 125,000-voxel upload", statuses=(413,))
    assert "125,000" in detail and "--conf max_voxels" in detail, detail
    # what fits the limit is served
    r = infer(
        srv,
        "medsam2_2d",
        {"label": "lesion", "roi": [10, 40, 10, 40, 0, 0], "slice": 0},
        "memory",
        image="xray_2d",
        timeout=SERVED_TIMEOUT_S,
    )
    assert r.status_code == 200, r.text
    assert srv.alive()


def test_dicom_series_over_max_voxels_is_refused_before_decoding(tmp_path):
    """A DICOM series folder (how DICOMweb studies arrive) is measured from its first header and the file count,
    before any slice is decoded (only that check words its answer this way); within the limit it loads."""
    from lib.errors import ImageUnreadable
    from lib.imaging.volume_io import load_image

    source_ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # 128 x 128
    series = pydicom.uid.generate_uid()
    for k in range(20):
        ds = source_ds.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, pydicom.uid.generate_uid(), k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.save_as(str(tmp_path / f"slice{k:03d}.dcm"))
    CASES["memory"] += 2
    with pytest.raises(ImageUnreadable) as refused:
        load_image(tmp_path, max_voxels=128 * 128 * 20 - 1)
    message = str(refused.value)
    assert refused.value.status == 413 and "series has 20 slices and 327,680 voxels" in message, message
    assert "--conf max_voxels" in message
    assert load_image(tmp_path, max_voxels=128 * 128 * 20).array.shape == (20, 128, 128)


@FUZZ
@given(upload=broken_upload(), model=st.sampled_from(["medsam2_3d", "medsam2_scribbles", "medsam2_2d"]))
@example(upload=("label.nii", _volume_bytes(".nii", (16, 80, 96))[:-1]), model="medsam2_3d")
@example(upload=("label.nii.gz", _volume_bytes(".nii.gz", (16, 80, 96))), model="medsam2_scribbles")
@example(upload=("label.bin", b"\x01" * (16 * 80 * 96)), model="medsam2_3d")
@example(upload=("huge.nii", huge_header_nifti()), model="medsam2_scribbles")
def test_broken_label_uploads_are_refused(fuzz_server, upload, model):
    """A label file sent with a request (scribbles, or a label to refine): never a 500, a hang or a crash."""
    name, data = upload
    params = {"prompts": [{"label": "lesion", "slice": 8, "box": [30, 20, 70, 60]}], "selected_label_name": "lesion"}
    r = infer(
        fuzz_server,
        model,
        params,
        "label uploads",
        files={"label": (name, io.BytesIO(data), "application/octet-stream")},
    )
    assert_refused(r, (model, name[:80], len(data)))
