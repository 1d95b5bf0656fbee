"""Build the demo studies folder from the real cases (images + manual labels) that the source archive of
``pyradiomics-bhklab==3.1.4`` ships under ``data/``: NRRD -> NIfTI, the labels registered as final labels in
MONAI Label's local datastore layout (``<out>/<case>.nii.gz`` and ``<out>/labels/final/<case>.nii.gz``).

    python scripts/prepare_demo.py [--output demo/studies] [--cache .cache/demo] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from safe_tar import safe_extract

REPO = Path(__file__).resolve().parents[1]
PACKAGE, VERSION = "pyradiomics-bhklab", "3.1.4"
ARCHIVE = f"pyradiomics_bhklab-{VERSION}.tar.gz"
# sha256 of the sdist as listed on https://pypi.org/simple/pyradiomics-bhklab/
SHA256 = "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb"
# largest geometry difference (mm, or direction cosine) between an image and its label taken as float noise
GEOMETRY_TOL = 1e-3
# what NIfTI's float32 header fields may move the geometry by on the way out
NIFTI_TOL = 1e-4


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(cache: Path) -> Path:
    """The package's source archive in ``cache`` (downloaded with pip unless already there), checked by sha256."""
    target = cache / ARCHIVE
    if target.exists():
        print(f"using cached {target}")
    else:
        cache.mkdir(parents=True, exist_ok=True)
        # --no-binary for this package only: with ":all:" pip would also build the archive's build dependencies
        # (setuptools, numpy, versioneer) from source to read its metadata, which fails.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE]
        cmd += ["--disable-pip-version-check", "--progress-bar", "off", f"{PACKAGE}=={VERSION}", "-d", str(cache)]
        print("downloading:", " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not target.exists():
            tail = (done.stdout + done.stderr)[-3000:]
            raise SystemExit(f"could not download {PACKAGE}=={VERSION} (pip exit {done.returncode}):\n{tail}")
    found = sha256(target)
    if found != SHA256:
        target.unlink()
        raise SystemExit(f"{target}: sha256 {found} != {SHA256}; removed it, run again to download it anew")
    return target


def geometry(image: sitk.Image) -> np.ndarray:
    """Origin, spacing and direction as one flat vector."""
    return np.concatenate([image.GetOrigin(), image.GetSpacing(), image.GetDirection()])


def label_array(label: sitk.Image, name: str) -> tuple[np.ndarray, list[int]]:
    """The label voxels as uint8 (binary masks as 0/1, several labels kept) and the original nonzero values."""
    arr = sitk.GetArrayFromImage(label)
    values = [int(v) for v in np.unique(arr) if v != 0]
    if len(values) <= 1:
        return (arr != 0).astype(np.uint8), values
    if min(values) < 0 or max(values) > 255 or not np.array_equal(arr, np.round(arr)):
        raise SystemExit(f"{name}: label values {values} do not fit uint8")
    return arr.astype(np.uint8), values


def convert_case(image_nrrd: Path, label_nrrd: Path, out: Path, name: str) -> str:
    """Write ``<out>/<name>.nii.gz`` and ``<out>/labels/final/<name>.nii.gz``; returns a one-line summary."""
    image = sitk.ReadImage(str(image_nrrd))
    label = sitk.ReadImage(str(label_nrrd))
    if label.GetSize() != image.GetSize():
        raise SystemExit(f"{name}: label size {label.GetSize()} != image size {image.GetSize()}")
    drift = float(np.abs(geometry(label) - geometry(image)).max())
    if drift > GEOMETRY_TOL:
        raise SystemExit(f"{name}: label geometry differs from the image's by {drift:g}, not float noise")
    arr, values = label_array(label, name)
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(image)  # the image's geometry, exactly (drift above is at most float noise)
    image_path, label_path = out / f"{name}.nii.gz", out / "labels" / "final" / f"{name}.nii.gz"
    label_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(image_path), useCompression=True)
    sitk.WriteImage(mask, str(label_path), useCompression=True)
    written_image, written_label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    if not (
        written_image.GetSize() == written_label.GetSize() == image.GetSize()
        and np.array_equal(geometry(written_image), geometry(written_label))
        and np.allclose(geometry(written_image), geometry(image), rtol=0, atol=NIFTI_TOL)
    ):
        raise SystemExit(f"{name}: the NIfTI files do not keep the NRRD geometry")
    slices = np.nonzero(arr.any(axis=(1, 2)))[0]  # numpy axis 0 is the last image axis (k)
    span = f"k {slices.min()}..{slices.max()}" if slices.size else "none"
    spacing = ", ".join(f"{s:.4g}" for s in image.GetSpacing())
    return (
        f"{name}: shape {image.GetSize()} spacing ({spacing}) label values {values} -> "
        f"{int((arr > 0).sum())} voxels on {slices.size}/{image.GetSize()[2]} slices ({span})"
    )


def main(argv: list[str] | None = None) -> int:
    """Convert every case of the archive that has both an image and a label."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=REPO / "demo" / "studies", help="studies folder to write")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "demo", help="where the archive is kept")
    ap.add_argument("--force", action="store_true", help="rebuild cases that exist already")
    args = ap.parse_args(argv)
    out: Path = args.output
    archive = fetch_archive(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory() as tmp:
        members = {
            Path(m.name).name: m
            for m in tar.getmembers()
            if m.isfile() and Path(m.name).parent.name == "data" and m.name.endswith(".nrrd")
        }
        images = sorted(n.removesuffix("_image.nrrd") for n in members if n.endswith("_image.nrrd"))
        cases = [c for c in images if f"{c}_label.nrrd" in members]
        if not cases:
            raise SystemExit(f"{archive}: no data/<case>_image.nrrd with a data/<case>_label.nrrd")
        for unpaired in sorted(set(images) - set(cases)):
            print(f"{unpaired}: no label in the archive, left out")
        for case in cases:
            done = (out / f"{case}.nii.gz").exists() and (out / "labels" / "final" / f"{case}.nii.gz").exists()
            if done and not args.force:
                print(f"{case}: already there, skipped (--force rebuilds)")
                continue
            paths = []
            for suffix in ("image", "label"):
                member = members[f"{case}_{suffix}.nrrd"]
                member.name = Path(member.name).name  # extract flat into tmp, never outside it
                safe_extract(tar, tmp, [member])
                paths.append(Path(tmp) / member.name)
            print(convert_case(paths[0], paths[1], out, case), flush=True)
    print(f"demo studies in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
