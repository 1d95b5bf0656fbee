"""Cine loops (2D+t): multi-frame DICOM and video files read as frame stacks, listed by the datastore, and
propagated along time by the real server."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixel_data_handlers.util import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_server_2d import infer, split_multipart

from conftest import start_server, stop_server
from lib.errors import ImageUnreadable
from lib.imaging.cine_io import luminance
from lib.imaging.volume_io import load_image

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
VIDEO_ENDOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.1.1"
MPEG4_AVC_HIGH_PROFILE = "1.2.840.10008.1.2.4.102"
XRAY_ANGIOGRAPHIC = "1.2.840.10008.5.1.4.1.1.12.1"
MODALITIES = {US_MULTIFRAME: "US", VIDEO_ENDOSCOPIC: "ES", XRAY_ANGIOGRAPHIC: "XA"}
FRAMES, ROWS, COLS = 10, 48, 64


def real_ultrasound_loop(frames: int = FRAMES, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """(frames, rows, cols, 3) uint8 RGB: windows sliding across a real colour ultrasound frame (GE LOGIQ 700,
    60 x 80, shipped with pydicom), like a probe moving."""
    source = pydicom.dcmread(get_testdata_file("ExplVR_BigEnd.dcm")).pixel_array
    dy, dx = source.shape[0] - rows, source.shape[1] - cols
    steps = [(round(f * dy / (frames - 1)), round(f * dx / (frames - 1))) for f in range(frames)]
    return np.stack([source[y : y + rows, x : x + cols] for y, x in steps])


def ybr_full_422_bytes(rgb: np.ndarray) -> bytes:
    """RGB frames -> uncompressed YBR_FULL_422 pixel data: Y0 Y1 Cb Cr for each pair of pixels along a row."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float32)
    pairs = ybr.reshape(*ybr.shape[:-2], ybr.shape[-2] // 2, 2, 3)
    chroma = np.rint(pairs[..., 1:].mean(axis=-2))
    packed = np.concatenate([pairs[..., 0], chroma], axis=-1)  # Y0, Y1, Cb, Cr
    return packed.astype(np.uint8).tobytes()


def write_multiframe_dicom(
    path: Path, rgb: np.ndarray, photometric: str = "RGB", sop_class: str = US_MULTIFRAME, **attributes
) -> Path:
    """A multi-frame DICOM file (uncompressed): ``rgb`` colour frames stored as ``photometric``, or grey frames."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = MODALITIES[sop_class]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.NumberOfFrames, ds.Rows, ds.Columns = rgb.shape[:3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if rgb.ndim == 4 else 1), photometric
    if rgb.ndim == 4:
        ds.PlanarConfiguration = 0
    bits = rgb.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if photometric == "YBR_FULL":
        ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    elif photometric == "YBR_FULL_422":
        ds.PixelData = ybr_full_422_bytes(rgb)
    else:
        ds.PixelData = rgb.tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path), write_like_original=False)
    return path


def ultrasound_regions(delta_x_cm: float, delta_y_cm: float) -> list[Dataset]:
    """SequenceOfUltrasoundRegions with one 2D tissue region in cm, and a smaller Doppler strip in cm/s."""
    tissue, doppler = Dataset(), Dataset()
    tissue.RegionSpatialFormat, tissue.RegionDataType = 1, 1
    tissue.RegionLocationMinX0, tissue.RegionLocationMinY0 = 0, 0
    tissue.RegionLocationMaxX1, tissue.RegionLocationMaxY1 = COLS - 1, ROWS - 1
    tissue.PhysicalUnitsXDirection, tissue.PhysicalUnitsYDirection = 3, 3
    tissue.PhysicalDeltaX, tissue.PhysicalDeltaY = delta_x_cm, delta_y_cm
    doppler.RegionSpatialFormat, doppler.RegionDataType = 3, 3
    doppler.RegionLocationMinX0, doppler.RegionLocationMinY0 = 0, 0
    doppler.RegionLocationMaxX1, doppler.RegionLocationMaxY1 = 9, 9
    doppler.PhysicalUnitsXDirection, doppler.PhysicalUnitsYDirection = 4, 7  # seconds, cm/s
    doppler.PhysicalDeltaX, doppler.PhysicalDeltaY = 0.01, 0.5
    return [doppler, tissue]


def moving_disc_loop(frames: int = 12, rows: int = 64, cols: int = 96, radius: float = 8.0):
    """(frames, rows, cols, 3) uint8 RGB: a bright disc crossing a textured background; and its centres (x, y)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:rows, :cols]
    background = 40 + 30 * np.sin(xx / 7.0) * np.cos(yy / 5.0) + rng.normal(0, 4, (rows, cols))
    centres = [(16 + f * (cols - 32) / (frames - 1), rows / 2 + 6 * np.sin(f / 2)) for f in range(frames)]
    video = []
    for cx, cy in centres:
        grey = background.copy()
        grey[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = 220
        rgb = np.clip(np.stack([grey * 0.9, grey, grey * 0.8], axis=-1), 0, 255)
        video.append(rgb.astype(np.uint8))
    return np.stack(video), centres


def write_video(path: Path, rgb: np.ndarray, fps: int = 25) -> Path:
    """MP4 (H.264) with PyAV, or animated GIF with Pillow, by the file's suffix."""
    if path.suffix == ".gif":
        first, *rest = (Image.fromarray(f) for f in rgb)
        first.save(path, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
        return path
    with av.open(str(path), "w") as container:
        _encode_h264(container, rgb, fps)
    return path


def _encode_h264(container, rgb: np.ndarray, fps: int) -> None:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = rgb.shape[2], rgb.shape[1], "yuv420p"
    stream.options = {"crf": "12"}
    for frame in rgb:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def disc_centre(frame: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(frame > 150)
    return float(xs.mean()), float(ys.mean())


# ---------------------------------------------------------------- multi-frame DICOM


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "YBR_FULL_422"])
def test_multiframe_ultrasound_is_read_as_grey_frames(tmp_path, photometric):
    rgb = real_ultrasound_loop()
    path = write_multiframe_dicom(
        tmp_path / "us.dcm",
        rgb,
        photometric,
        FrameTime=33.3,
        SequenceOfUltrasoundRegions=ultrasound_regions(0.05, 0.04),
    )
    image = load_image(path)
    assert image.array.shape == (FRAMES, ROWS, COLS)
    assert image.reference.GetSize() == (COLS, ROWS, FRAMES)
    # the tissue region's deltas (cm -> mm), not the Doppler strip's; frame spacing = FrameTime (ms)
    assert np.allclose(image.spacing, (0.5, 0.4, 33.3))
    expected = luminance(rgb).astype(np.float32)  # BT.601 luma of the real RGB frames
    error = np.abs(image.array.astype(np.float32) - expected)
    assert error.mean() < (0.01 if photometric == "RGB" else 1.5), error.mean()
    first_channel = rgb[..., 0].astype(np.float32)
    assert np.abs(image.array - first_channel).mean() > 10  # not the red channel: this loop is mostly yellow
    # each frame is closest to its own window of the source: all frames, in order
    distances = np.abs(image.array[:, None].astype(np.float32) - expected[None]).mean(axis=(2, 3))
    assert distances.argmin(axis=1).tolist() == list(range(FRAMES))


def test_pixel_spacing_wins_and_plain_files_get_unit_spacing(tmp_path):
    rgb = real_ultrasound_loop()
    spaced = write_multiframe_dicom(
        tmp_path / "spaced.dcm",
        rgb,
        PixelSpacing=[0.3, 0.2],  # row, column
        FrameTimeVector=[0.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0],
        SequenceOfUltrasoundRegions=ultrasound_regions(0.05, 0.04),
    )
    assert np.allclose(load_image(spaced).spacing, (0.2, 0.3, 40.0))
    plain = write_multiframe_dicom(tmp_path / "plain.dcm", rgb, "YBR_FULL")
    assert np.allclose(load_image(plain).spacing, (1.0, 1.0, 1.0))


def test_jpeg_baseline_ybr_full_422_frames_are_decoded_and_converted(tmp_path):
    # the usual encoding of ultrasound loops: JPEG baseline, YBR_FULL_422 (a bundled real JPEG frame, repeated)
    source = pydicom.dcmread(get_testdata_file("SC_rgb_dcmtk_+eb+cy+np.dcm"))
    reference_rgb = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array  # same picture, lossless
    jpeg_frame = pydicom.encaps.defragment_data(source.PixelData)
    source.PixelData = encapsulate([jpeg_frame] * 8)
    source["PixelData"].VR = "OB"
    source.NumberOfFrames = 8
    source.FrameTime = 50.0
    source.SOPClassUID = source.file_meta.MediaStorageSOPClassUID = US_MULTIFRAME
    source.save_as(str(tmp_path / "jpeg_loop.dcm"))
    image = load_image(tmp_path / "jpeg_loop.dcm")
    assert image.array.shape == (8, 100, 100) and np.allclose(image.spacing, (1.0, 1.0, 50.0))
    error = np.abs(image.array.astype(np.float32) - luminance(reference_rgb)[None])
    assert error.mean() < 3, error.mean()


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_grey_angiography_loop(tmp_path, photometric):
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.uint16)  # real pixels
    frames = np.stack([np.roll(ct, 3 * f, axis=1) for f in range(8)])
    stored = frames if photometric == "MONOCHROME2" else frames.max() + frames.min() - frames
    path = write_multiframe_dicom(tmp_path / "xa.dcm", stored, photometric, sop_class=XRAY_ANGIOGRAPHIC, CineRate=15)
    image = load_image(path)
    assert image.array.shape == (8, 128, 128) and np.allclose(image.spacing, (1.0, 1.0, 1000 / 15))
    assert np.array_equal(image.array, frames)  # MONOCHROME1 inverted back: bright is bright


def test_spatial_multiframe_dicom_stays_a_volume():
    dose = load_image(get_testdata_file("rtdose.dcm"))  # RT dose: its frames are slices, not time
    assert dose.array.shape == (15, 10, 10) and np.allclose(dose.spacing, (10.0, 10.0, 5.0))


def test_too_large_is_refused_before_decoding_and_broken_frames_are_415(tmp_path):
    path = write_multiframe_dicom(tmp_path / "broken.dcm", real_ultrasound_loop(), "RGB", FrameTime=20.0)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]  # truncated: only the header can be read
    ds.save_as(str(path))
    with pytest.raises(ImageUnreadable) as too_large:
        load_image(path, max_voxels=FRAMES * ROWS * COLS - 1)
    assert too_large.value.status == 413 and "max_voxels" in str(too_large.value)
    with pytest.raises(ImageUnreadable) as unreadable:
        load_image(path)
    assert unreadable.value.status == 415 and "broken.dcm" in str(unreadable.value)


def test_single_frame_colour_images_become_luminance_too(tmp_path):
    rgb = real_ultrasound_loop(frames=2)[0]
    image = sitk.GetImageFromArray(rgb, isVector=True)
    sitk.WriteImage(image, str(tmp_path / "frame.png"))
    loaded = load_image(tmp_path / "frame.png")
    assert loaded.array.shape == (1, ROWS, COLS)
    assert np.array_equal(loaded.array[0], luminance(rgb))


def test_encapsulated_h264_endoscopy_video_is_decoded(tmp_path):
    rgb, centres = moving_disc_loop()
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="h264") as container:  # an Annex B H.264 elementary stream
        _encode_h264(container, rgb, fps=25)
    path = tmp_path / "endoscopy.dcm"
    write_multiframe_dicom(path, rgb, "RGB", sop_class=VIDEO_ENDOSCOPIC, FrameTime=40.0)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG4_AVC_HIGH_PROFILE
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path))
    image = load_image(path)
    assert image.array.shape == (len(rgb), rgb.shape[1], rgb.shape[2])
    assert np.allclose(image.spacing, (1.0, 1.0, 40.0))
    for frame, (cx, cy) in zip(image.array, centres, strict=True):
        x, y = disc_centre(frame)
        assert abs(x - cx) < 1.5 and abs(y - cy) < 1.5


# ---------------------------------------------------------------- video files


@pytest.mark.parametrize("suffix,fps,interval", [(".mp4", 25, 40.0), (".gif", 20, 50.0)])
def test_video_frames_are_the_sequence(tmp_path, suffix, fps, interval):
    rgb, centres = moving_disc_loop()
    path = write_video(tmp_path / f"clip{suffix}", rgb, fps)
    image = load_image(path)
    assert image.array.shape == (len(rgb), rgb.shape[1], rgb.shape[2])  # every frame, frame geometry
    assert np.allclose(image.spacing, (1.0, 1.0, interval))
    for frame, (cx, cy) in zip(image.array, centres, strict=True):  # each frame in its place in time
        x, y = disc_centre(frame)
        assert abs(x - cx) < 1.5 and abs(y - cy) < 1.5
    assert np.abs(image.array.astype(np.float32) - luminance(rgb)).mean() < 4  # grey, after compression
    with pytest.raises(ImageUnreadable) as too_large:
        load_image(path, max_voxels=5 * rgb.shape[1] * rgb.shape[2])
    assert too_large.value.status == 413


def test_unreadable_video_is_415(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video at all" * 50)
    with pytest.raises(ImageUnreadable) as unreadable:
        load_image(path)
    assert unreadable.value.status == 415 and "broken.mp4" in str(unreadable.value)


# ---------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def cine_server(random_checkpoint, tmp_path_factory):
    """A server on a datastore of cine loops, plus a single-frame DICOM file that is not one."""
    root = tmp_path_factory.mktemp("cine_studies")
    write_multiframe_dicom(
        root / "us_cine.dcm",
        real_ultrasound_loop(),
        "YBR_FULL_422",
        FrameTime=33.3,
        SequenceOfUltrasoundRegions=ultrasound_regions(0.05, 0.04),
    )
    write_video(root / "clip.mp4", moving_disc_loop()[0])
    single = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    single.save_as(str(root / "single_slice.dcm"))
    log = tmp_path_factory.mktemp("cine_logs") / "server.log"
    server = start_server(root, {"checkpoint": str(random_checkpoint), "window": "auto"}, log)
    yield server, root
    stop_server(server)


def test_datastore_lists_cine_loops_only(cine_server):
    server, _ = cine_server
    listing = server.get("/datastore/?output=all").json()
    assert set(listing["objects"]) == {"us_cine", "clip"}


def test_3d_propagates_along_time_from_a_middle_frame_and_the_label_saves(cine_server, tmp_path):
    server, root = cine_server
    params = {"prompts": [{"label": "lesion", "slice": FRAMES // 2, "box": [12, 10, 44, 36]}], "client_id": "cine"}
    r = infer(server, "medsam2_3d", "us_cine", params)
    assert r.status_code == 200, r.text
    label, result = split_multipart(r)
    assert label.GetSize() == (COLS, ROWS, FRAMES)  # one label slice per frame, frame geometry
    assert np.allclose(label.GetSpacing(), (0.5, 0.4, 33.3))
    assert result["image"]["shape_ijk"] == [COLS, ROWS, FRAMES] and result["axis"] == "axial"
    coverage = result["coverage"]["lesion"]
    assert coverage["slices_propagated"] == [0, FRAMES - 1] and coverage["num_slices_propagated"] == FRAMES
    assert result["prompts"][0]["slice"] == FRAMES // 2
    # MONAI Label saves the label as <image id>.nii.gz next to the loop
    sitk.WriteImage(label, str(tmp_path / "answer.nii.gz"))
    with open(tmp_path / "answer.nii.gz", "rb") as f:
        url = f"{server.url}/datastore/label?image=us_cine&tag=final"
        saved = requests.put(url, files={"label": ("answer.nii.gz", f)}, timeout=60)
    assert saved.status_code == 200, saved.text
    assert (root / "labels" / "final" / "us_cine.nii.gz").exists()
    objects = server.get("/datastore/?output=all").json()["objects"]
    assert "final" in objects["us_cine"]["labels"]


def test_2d_box_on_a_video_frame(cine_server):
    server, _ = cine_server
    params = {"label": "organ", "roi": [30, 50, 20, 44, 4, 4], "slice": 4, "client_id": "video"}
    r = infer(server, "medsam2_2d", "clip", params)
    assert r.status_code == 200, r.text
    label, result = split_multipart(r)
    assert label.GetSize() == (96, 64, 12) and np.allclose(label.GetSpacing(), (1.0, 1.0, 40.0))
    assert set(np.nonzero(sitk.GetArrayFromImage(label))[0].tolist()) <= {4}
    assert np.allclose(result["image"]["spacing"], (1.0, 1.0, 40.0))
