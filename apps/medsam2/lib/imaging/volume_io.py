"""Reading images and writing labels with the image's exact geometry (SimpleITK does both)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lib.errors import ImageUnreadable, NotFound, Unprocessable
from lib.imaging.cine_io import FrameSequence, grey_from_channels, read_frame_sequence, refuse_if_too_large


@dataclass
class LoadedImage:
    """Voxels in (k, j, i) order plus a geometry-only reference image for writing labels."""

    array: np.ndarray
    reference: sitk.Image

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(self.reference.GetSpacing())


RESAMPLE = "Crop or resample the image"


def _read(path: Path, max_voxels: int | None = None) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ImageUnreadable(f"The folder {path.name} holds no DICOM series.", status=415)
        files = reader.GetGDCMSeriesFileNames(str(path), series[0])
        if max_voxels is not None and files:  # from the first file's header and the file count, before decoding
            first = sitk.ImageFileReader()
            first.SetFileName(files[0])
            first.ReadImageInformation()
            has = f"The DICOM series has {len(files):,} slices and"
            refuse_if_too_large(math.prod(first.GetSize()) * len(files), max_voxels, has, "Crop or resample the series")
        reader.SetFileNames(files)
        return reader.Execute()
    return sitk.ReadImage(str(path))


def _to_grey(image: sitk.Image) -> sitk.Image:
    """Colour (RGB/RGBA) -> luminance; other multi-component images -> their first component."""
    grey = sitk.GetImageFromArray(grey_from_channels(sitk.GetArrayFromImage(image)))
    grey.CopyInformation(image)
    return grey


def _from_frames(sequence: FrameSequence) -> LoadedImage:
    """A cine loop as a volume: frames along k, spacing (column mm, row mm, frame interval ms)."""
    frames, rows, cols = sequence.frames.shape
    reference = sitk.Image([cols, rows, frames], sitk.sitkUInt8)
    reference.SetSpacing(sequence.spacing)
    return LoadedImage(sequence.frames, reference)


def _nifti_data_offset(head: bytes) -> int | None:
    """Where the voxel data of a single-file NIfTI-1/2 starts (``vox_offset``); None if not a NIfTI header."""
    for order in "<>":
        if len(head) >= 112 and struct.unpack(order + "i", head[:4])[0] == 348:
            return int(struct.unpack(order + "f", head[108:112])[0])
        if len(head) >= 176 and struct.unpack(order + "i", head[:4])[0] == 540:
            return int(struct.unpack(order + "q", head[168:176])[0])
    return None


def _gzip_holds(path: Path, needed: int) -> bool:
    """Whether the gzip file decompresses to at least ``needed`` bytes: its trailer's size field (the
    uncompressed size mod 2**32) settles it at once for a complete single-member file; otherwise the stream is
    read through (stopping at ``needed``) and a stream cut short reads as too short."""
    total = 0
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if struct.unpack("<I", f.read(4))[0] == needed % 2**32:
                return True
        with gzip.open(path, "rb") as f:
            while total < needed:
                chunk = f.read(min(1 << 22, needed - total))
                if not chunk:
                    break
                total += len(chunk)
    except (EOFError, OSError, zlib.error, struct.error):
        return False
    return total >= needed


def _read_header(path: Path) -> sitk.ImageFileReader | None:
    """The file's image information (size, pixel type) without its voxels; None if ITK cannot read it."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _refuse_truncated_nifti(path: Path, reader: sitk.ImageFileReader) -> None:
    """ITK reads a NIfTI file (``.nii`` or ``.nii.gz``) whose voxel data is cut short without complaint (the
    missing voxels become zeros): refuse it (415) when the file holds less data than its header describes."""
    compressed = path.name.lower().endswith(".gz")
    component_bytes = sitk.Image([1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()
    data_bytes = math.prod(reader.GetSize()) * reader.GetNumberOfComponents() * component_bytes
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            offset = _nifti_data_offset(f.read(540))
        if offset is None:
            return
        complete = _gzip_holds(path, offset + data_bytes) if compressed else path.stat().st_size >= offset + data_bytes
    except (EOFError, OSError, zlib.error, struct.error):  # a header that ITK read, in a stream cut short
        complete = False
    if not complete:
        raise ImageUnreadable(
            f"The NIfTI file {path.name} is truncated or damaged: its header describes {data_bytes:,} bytes of "
            f"voxel data that the file does not hold. Upload or copy the complete file.",
            status=415,
        )


def load_image(path: str | os.PathLike, max_voxels: int | None = None) -> LoadedImage:
    """Read a NIfTI/NRRD/MHA file, a DICOM series folder, or a cine loop (multi-frame DICOM, video file).

    Raise :class:`PromptError` (4xx) if the image is missing, too large or unreadable.
    """
    p = Path(path)
    if not str(path) or not p.exists():
        raise NotFound("The image was not found in the datastore. Check the image id.")
    if p.is_file():
        sequence = read_frame_sequence(p, max_voxels)
        if sequence is not None:
            return _from_frames(sequence)
    if p.is_file() and (max_voxels is not None or p.name.lower().endswith((".nii", ".nii.gz"))):
        header = _read_header(p)
        if header is None and max_voxels is not None:
            raise ImageUnreadable(f"The image file {p.name} cannot be read as a medical image.", status=415)
        if header is not None:  # else (no limit set) the full read below says why it cannot be read
            refuse_if_too_large(math.prod(header.GetSize()), max_voxels, advice=RESAMPLE)
            if p.name.lower().endswith((".nii", ".nii.gz")):
                _refuse_truncated_nifti(p, header)
    try:
        image = _read(p, max_voxels)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"The image {p.name} cannot be read as a medical image ({first[:200]})."
        raise ImageUnreadable(message, status=415) from None
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = _to_grey(image)
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise ImageUnreadable(
            f"Only 2D and 3D images are supported; this one has {image.GetDimension()} dimensions.", 415
        )
    array = sitk.GetArrayFromImage(image)
    refuse_if_too_large(array.size, max_voxels, advice=RESAMPLE)
    reference = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(image)
    return LoadedImage(array, reference)


LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")


def label_suffix(requested: object) -> str:
    """The label file type a viewer asks for (``result_extension``; OHIF's panel parses NRRD only), else NIfTI."""
    return requested if isinstance(requested, str) and requested in LABEL_SUFFIXES else ".nii.gz"


def write_label(label_kji: np.ndarray, reference: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write a uint8 label volume with the reference image's origin, spacing and direction (the file type
    follows the suffix of ``path``)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(label_kji.astype(np.uint8)))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), useCompression=compress)


def _label_header(path: str | os.PathLike, what: str) -> sitk.ImageFileReader:
    """The label file's header, read without its voxels (a forged header must not make us allocate gigabytes)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise Unprocessable(f"The {what} cannot be read as a label image (send NIfTI or NRRD).") from None
    return reader


def _read_label(reader: sitk.ImageFileReader, what: str) -> sitk.Image:
    try:
        return reader.Execute()
    except RuntimeError:
        raise Unprocessable(f"The {what} cannot be read as a label image (truncated or corrupt file).") from None


def read_label_values(path: str | os.PathLike, max_voxels: int | None) -> np.ndarray:
    """A label file's values as (k, j, i) int32, with no geometry check (see :func:`load_label_on`)."""
    reader = _label_header(path, "uploaded label")
    refuse_if_too_large(math.prod(reader.GetSize()), max_voxels, "The label has", "Send the label on the image's grid")
    return sitk.GetArrayFromImage(_read_label(reader, "uploaded label")).astype(np.int32)


def describe_grid(size, spacing, origin) -> str:
    """A voxel grid in words: size (i x j x k), spacing and origin."""
    sizes = "x".join(str(int(n)) for n in size)
    spacings = ", ".join(f"{v:.4g}" for v in spacing)
    return f"{sizes} voxels, spacing ({spacings}) mm, origin ({', '.join(f'{v:.4g}' for v in origin)})"


def describe_image_grid(image: sitk.Image) -> str:
    """:func:`describe_grid` of an image."""
    return describe_grid(image.GetSize(), image.GetSpacing(), image.GetOrigin())


def load_label_on(path: str | os.PathLike, reference: sitk.Image, what: str = "label") -> np.ndarray:
    """A label volume that lies on the image's voxel grid, as (k, j, i) int32 values.

    Raise :class:`Unprocessable` when the file is not a label image or its grid differs from the image's
    (size, spacing, origin or axes): labels are compared voxel for voxel, never resampled silently.
    """
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"The {what} file was not found.")
    reader = _label_header(p, what)
    size = tuple(reader.GetSize()) + (1,) * (3 - reader.GetDimension())
    if reader.GetNumberOfComponents() != 1 or reader.GetDimension() not in (2, 3):
        raise Unprocessable(f"The {what} must be a single-channel 2D or 3D label image.")
    if size != reference.GetSize():
        grid = describe_grid(size, reader.GetSpacing(), reader.GetOrigin())
        raise Unprocessable(
            f"The {what} lies on another voxel grid ({grid}) than the image ({describe_image_grid(reference)}): "
            "export the label on the image's geometry (in Slicer: the segmentation's reference volume)."
        )
    label = _read_label(reader, what)
    if label.GetDimension() == 2:
        label = sitk.JoinSeries(label)
    spacing = np.asarray(reference.GetSpacing())
    mismatch = [
        name
        for name, a, b, tol in (
            ("spacing", label.GetSpacing(), reference.GetSpacing(), 1e-3 * spacing.min()),
            ("origin", label.GetOrigin(), reference.GetOrigin(), 1e-2 * spacing.min()),
            ("axes (direction)", label.GetDirection(), reference.GetDirection(), 1e-3),
        )
        if not np.allclose(a, b, atol=tol, rtol=0)
    ]
    if mismatch:
        grid = describe_image_grid(label)
        raise Unprocessable(
            f"The {what} lies on another voxel grid ({grid}) than the image ({describe_image_grid(reference)}): its "
            f"{', '.join(mismatch)} differ. Resample it onto the image, or export it with the image as reference."
        )
    array = sitk.GetArrayFromImage(label)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise Unprocessable(f"The {what} holds fractional values: send whole label values.")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise Unprocessable(f"The {what} holds values outside 0..255 ({array.min()}..{array.max()}).")
    return array.astype(np.int32)
