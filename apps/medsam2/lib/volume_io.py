"""Reading images and writing labels with the image's exact geometry (SimpleITK does both)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .cine_io import FrameSequence, grey_from_channels, read_frame_sequence
from .prompts import PromptError


@dataclass
class LoadedImage:
    """Voxels in (k, j, i) order plus a geometry-only reference image for writing labels."""

    array: np.ndarray
    reference: sitk.Image

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(self.reference.GetSpacing())


def _read(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise PromptError(f"The folder {path.name} holds no DICOM series.", status=415)
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
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


def load_image(path: str | os.PathLike, max_voxels: int | None = None) -> LoadedImage:
    """Read a NIfTI/NRRD/MHA file, a DICOM series folder, or a cine loop (multi-frame DICOM, video file).

    Raise :class:`PromptError` (4xx) if the image is missing, too large or unreadable.
    """
    p = Path(path)
    if not str(path) or not p.exists():
        raise PromptError("The image was not found in the datastore. Check the image id.", status=404)
    if p.is_file():
        sequence = read_frame_sequence(p, max_voxels)
        if sequence is not None:
            return _from_frames(sequence)
    if max_voxels is not None and p.is_file():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise PromptError(f"The image file {p.name} cannot be read as a medical image.", status=415) from None
        voxels = int(np.prod(reader.GetSize()))
        if voxels > max_voxels:
            raise PromptError(
                f"The image has {voxels:,} voxels, over this server's limit of {max_voxels:,} "
                f"(--conf max_voxels). Crop or resample the image, or raise the limit.",
                status=413,
            )
    try:
        image = _read(p)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"The image {p.name} cannot be read as a medical image ({first[:200]})."
        raise PromptError(message, status=415) from None
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = _to_grey(image)
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise PromptError(f"Only 2D and 3D images are supported; this one has {image.GetDimension()} dimensions.", 415)
    array = sitk.GetArrayFromImage(image)
    if max_voxels is not None and array.size > max_voxels:
        raise PromptError(f"The image has {array.size:,} voxels, over the limit of {max_voxels:,}.", status=413)
    reference = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(image)
    return LoadedImage(array, reference)


def write_label(label_kji: np.ndarray, reference: sitk.Image, path: str | os.PathLike) -> None:
    """Write a uint8 label volume with the reference image's origin, spacing and direction."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(label_kji.astype(np.uint8)))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), useCompression=True)
