"""Cine loops (2D+t): multi-frame DICOM files (ultrasound, angiography, endoscopy) and video files, read as a
stack of grey frames. The frame index is the k axis, so 3D propagation runs along time.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import ImageUnreadable

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".gif")

# ITU-R BT.601 luma weights: the Y of DICOM's YBR_FULL and of most video.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# SOP classes whose frames are a time series.
CINE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame (retired)",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame",
    "1.2.840.10008.5.1.4.1.1.12.1": "X-Ray Angiographic",
    "1.2.840.10008.5.1.4.1.1.12.2": "X-Ray Radiofluoroscopic",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Video Endoscopic",
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": "Video Microscopic",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Video Photographic",
}
# Transfer syntaxes that hold an MPEG-2 / H.264 / HEVC bit stream: decoded with PyAV, not pydicom.
VIDEO_TRANSFER_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)} | {"1.2.840.10008.1.2.4.100.1"}
FRAME_TIME = 0x00181063
FRAME_TIME_VECTOR = 0x00181065
CENTIMETRE = 3  # PhysicalUnits{X,Y}Direction code for cm in SequenceOfUltrasoundRegions
FRAMES_PER_CHUNK = 16  # colour conversion works on this many frames at a time (bounded float32 temporaries)


@dataclass
class FrameSequence:
    """Grey frames (n, rows, cols) and their spacing: column (x), row (y) in mm, frame interval in ms."""

    frames: np.ndarray
    spacing: tuple[float, float, float]


def luminance(channels: np.ndarray) -> np.ndarray:
    """Grey image from RGB(A) channels on the last axis (BT.601 weights); same dtype as the input."""
    grey = np.zeros(channels.shape[:-1], dtype=np.float32)
    for channel, weight in enumerate(LUMA_WEIGHTS):
        grey += channels[..., channel].astype(np.float32) * weight
    if np.issubdtype(channels.dtype, np.integer):
        info = np.iinfo(channels.dtype)
        return np.clip(np.rint(grey), info.min, info.max).astype(channels.dtype)
    return grey.astype(channels.dtype, copy=False)


def grey_from_channels(channels: np.ndarray) -> np.ndarray:
    """Colour (3 or 4 channels, last axis) -> luminance; any other multi-channel image -> its first channel."""
    if channels.shape[-1] in (3, 4):
        return luminance(channels)
    return np.ascontiguousarray(channels[..., 0])


def is_video_file(path: str | os.PathLike) -> bool:
    """A file this module reads as video, by its name."""
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _read_dicom_header(path: Path, defer_pixels: bool) -> Any | None:
    """The dataset (pixel data deferred or skipped), or None if ``path`` is not a readable DICOM Part 10 file."""
    if not _has_dicom_preamble(path):
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if defer_pixels:
            return pydicom.dcmread(str(path), defer_size="256 KB")
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError):
        return None


def _number_of_frames(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def is_multiframe_dicom(path: str | os.PathLike) -> bool:
    """True for a DICOM file with more than one frame (reads the header only)."""
    ds = _read_dicom_header(Path(path), defer_pixels=False)
    return ds is not None and _number_of_frames(ds) > 1


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else [value]


def is_time_sequence(ds: Any) -> bool:
    """Multi-frame DICOM whose frames are a time series (cine) rather than slices of a volume.

    Cine: a cine SOP class, a frame increment pointer to FrameTime/FrameTimeVector, or colour frames.
    Other multi-frame files (enhanced CT/MR, RT dose, NM) stay with SimpleITK, which reads their geometry.
    """
    if _number_of_frames(ds) < 2:
        return False
    if str(ds.get("SOPClassUID", "")) in CINE_SOP_CLASSES:
        return True
    if any(int(tag) in (FRAME_TIME, FRAME_TIME_VECTOR) for tag in _as_list(ds.get("FrameIncrementPointer"))):
        return True
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() not in ("MONOCHROME1", "MONOCHROME2")


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def dicom_pixel_spacing(ds: Any) -> tuple[float, float]:
    """(column, row) spacing in mm: PixelSpacing, else the largest ultrasound region in cm, else 1.0."""
    pixel_spacing = _as_list(ds.get("PixelSpacing"))
    if len(pixel_spacing) == 2:
        row, col = (_positive(v) for v in pixel_spacing)
        if row and col:
            return col, row
    best: tuple[int, tuple[float, float]] | None = None
    for region in _as_list(ds.get("SequenceOfUltrasoundRegions")):
        if region.get("PhysicalUnitsXDirection") != CENTIMETRE or region.get("PhysicalUnitsYDirection") != CENTIMETRE:
            continue
        dx, dy = _positive(region.get("PhysicalDeltaX")), _positive(region.get("PhysicalDeltaY"))
        if not (dx and dy):
            continue
        try:
            area = (int(region.RegionLocationMaxX1) - int(region.RegionLocationMinX0) + 1) * (
                int(region.RegionLocationMaxY1) - int(region.RegionLocationMinY0) + 1
            )
        except (AttributeError, TypeError, ValueError):
            area = 0
        if best is None or area > best[0]:
            best = (area, (abs(dx) * 10.0, abs(dy) * 10.0))
    return best[1] if best else (1.0, 1.0)


def dicom_frame_interval_ms(ds: Any) -> float:
    """Milliseconds between frames: FrameTime, else the mean of FrameTimeVector, else 1000 / CineRate; else 1.0."""
    frame_time = _positive(ds.get("FrameTime"))
    if frame_time:
        return frame_time
    increments = [_positive(v) for v in _as_list(ds.get("FrameTimeVector"))[1:]]
    if increments and all(increments):
        return float(np.mean(increments))
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _positive(ds.get(keyword))
        if rate:
            return 1000.0 / rate
    return 1.0


def refuse_if_too_large(
    voxels: int, max_voxels: int | None, has: str = "The image has", advice: str = "Crop or shorten the loop"
) -> None:
    """413 naming the limit when ``voxels`` (counted before decoding where possible) exceed ``max_voxels``."""
    if max_voxels is not None and voxels > max_voxels:
        raise ImageUnreadable(
            f"{has} {voxels:,} voxels, over this server's limit of {max_voxels:,} "
            f"(--conf max_voxels). {advice}, or raise the limit.",
            status=413,
        )


def _grey_dicom_frames(ds: Any, pixels: np.ndarray) -> np.ndarray:
    """Decoded frames (n, rows, cols[, samples]) -> grey (n, rows, cols), by photometric interpretation."""
    from pydicom.pixel_data_handlers.util import apply_color_lut, convert_color_space

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        if photometric == "PALETTE COLOR":
            chunks = [pixels[start : start + FRAMES_PER_CHUNK] for start in _chunks(len(pixels))]
            return np.concatenate([luminance(apply_color_lut(chunk, ds)) for chunk in chunks])
        grey = pixels
        slope, intercept = _positive(ds.get("RescaleSlope")) or 1.0, float(ds.get("RescaleIntercept", 0) or 0)
        if (slope, intercept) != (1.0, 0.0):
            grey = grey.astype(np.float32) * slope + intercept
        if photometric == "MONOCHROME1":  # 0 is white: invert so that bright means bright
            grey = (grey.max() - grey) + grey.min()
        return grey
    if pixels.ndim != 4:
        raise ImageUnreadable(f"Unexpected pixel layout {pixels.shape} in a multi-frame DICOM file.", status=415)
    grey = np.empty(pixels.shape[:3], dtype=pixels.dtype)
    for start in _chunks(len(pixels)):
        block = pixels[start : start + FRAMES_PER_CHUNK]
        if photometric in ("YBR_FULL", "YBR_FULL_422"):  # pydicom upsamples 4:2:2 chroma when decoding
            block = convert_color_space(block, photometric, "RGB")
        elif photometric not in ("RGB", "YBR_RCT", "YBR_ICT"):  # RCT/ICT: the JPEG 2000 decoder returns RGB
            raise ImageUnreadable(f"Colour frames in {photometric} are not supported; RGB or YBR_FULL are.", status=415)
        grey[start : start + FRAMES_PER_CHUNK] = luminance(block)
    return grey


def _chunks(count: int) -> range:
    return range(0, count, FRAMES_PER_CHUNK)


def _encapsulated_video(ds: Any) -> bytes:
    """The MPEG-2 / H.264 / HEVC bit stream of an encapsulated video transfer syntax, fragments joined."""
    from pydicom.encaps import defragment_data

    return defragment_data(ds.PixelData)


def read_cine_dicom(ds: Any, name: str, max_voxels: int | None) -> FrameSequence:
    """A multi-frame DICOM dataset (pixel data deferred) -> grey frames with their spacing."""
    frames, rows, cols = _number_of_frames(ds), int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        raise ImageUnreadable(f"The DICOM file {name} has no image size (Rows/Columns).", status=415)
    refuse_if_too_large(frames * rows * cols, max_voxels)
    if "PixelData" not in ds:
        raise ImageUnreadable(f"The DICOM file {name} holds no pixel data.", status=415)
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax in VIDEO_TRANSFER_SYNTAXES:
        video = read_video_stream(io.BytesIO(_encapsulated_video(ds)), name, max_voxels)
        grey = video.frames
    else:
        try:
            pixels = ds.pixel_array
        except (NotImplementedError, RuntimeError, ValueError, AttributeError, TypeError) as e:
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ImageUnreadable(
                f"The frames of {name} cannot be decoded (transfer syntax {syntax or 'unknown'}: {detail}).",
                status=415,
            ) from None
        if pixels.ndim == 2 or (pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) > 1):
            pixels = pixels[None]  # a single frame after all
        grey = _grey_dicom_frames(ds, pixels)
    column_spacing, row_spacing = dicom_pixel_spacing(ds)
    return FrameSequence(np.ascontiguousarray(grey), (column_spacing, row_spacing, dicom_frame_interval_ms(ds)))


def read_video_stream(source: str | io.BytesIO, name: str, max_voxels: int | None) -> FrameSequence:
    """Decode every frame of the first video stream with PyAV, to grey; frame interval from the frame rate."""
    try:
        import av
    except ImportError:
        raise ImageUnreadable(
            f"{name}: reading video needs the 'av' package (PyAV), not installed here.", 415
        ) from None
    grey_frames: list[np.ndarray] = []
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise ImageUnreadable(f"The file {name} holds no video stream.", status=415)
            stream = container.streams.video[0]
            rows, cols = stream.codec_context.height, stream.codec_context.width
            refuse_if_too_large(int(stream.frames or 0) * rows * cols, max_voxels)
            for frame in container.decode(stream):
                if not rows or not cols:
                    rows, cols = frame.height, frame.width
                refuse_if_too_large((len(grey_frames) + 1) * rows * cols, max_voxels)
                rgb = frame.to_ndarray(format="rgb24", width=cols, height=rows)
                grey_frames.append(luminance(rgb))
            rate = stream.average_rate or stream.guessed_rate
    except ImageUnreadable:
        raise
    except (av.error.FFmpegError, ValueError, EOFError) as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ImageUnreadable(f"The file {name} cannot be read as a video ({detail}).", status=415) from None
    if not grey_frames:
        raise ImageUnreadable(f"The video {name} has no frames.", status=415)
    interval = 1000.0 / float(rate) if rate and float(rate) > 0 else 1.0
    return FrameSequence(np.stack(grey_frames), (1.0, 1.0, interval))


def read_frame_sequence(path: str | os.PathLike, max_voxels: int | None = None) -> FrameSequence | None:
    """Grey frames of a video file or a cine multi-frame DICOM file; None for anything else."""
    p = Path(path)
    if is_video_file(p):
        return read_video_stream(str(p), p.name, max_voxels)
    ds = _read_dicom_header(p, defer_pixels=True)
    if ds is None or not is_time_sequence(ds):
        return None
    return read_cine_dicom(ds, p.name, max_voxels)
