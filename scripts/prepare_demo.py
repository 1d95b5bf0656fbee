"""Build the demo studies folder from the real cases (images + manual labels) that the source archive of
``pyradiomics-bhklab==3.1.4`` ships under ``data/``: NRRD -> NIfTI, labels registered as final labels in
MONAI Label's local datastore layout (``<out>/<case>.nii.gz`` and ``<out>/labels/final/<case>.nii.gz``).

    python scripts/prepare_demo.py [--output demo/studies] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
PACKAGE, VERSION = "pyradiomics-bhklab", "3.1.4"
ARCHIVE = f"pyradiomics_bhklab-{VERSION}.tar.gz"


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def fetch_archive(cache: Path) -> Path:
    """The package's source archive from the package index (cached; checked against the index's sha256)."""
    target = cache / ARCHIVE
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    page = urllib.request.urlopen(f"{_index_url()}/{PACKAGE}/", timeout=60).read().decode()
    links = [link for link in re.findall(r'href="([^"]+)"', page) if ARCHIVE in link]
    if not links:
        raise SystemExit(f"{ARCHIVE} is not listed on {_index_url()}/{PACKAGE}/")
    url, _, fragment = links[0].partition("#sha256=")
    if url.startswith("/"):
        url = re.sub(r"^(https?://[^/]+).*", r"\1", _index_url()) + url
    print(f"downloading {url}", flush=True)
    data = urllib.request.urlopen(url, timeout=300).read()
    if fragment and hashlib.sha256(data).hexdigest() != fragment:
        raise SystemExit(f"sha256 mismatch for {url}")
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return target


def convert_case(image_nrrd: Path, label_nrrd: Path, out: Path, name: str) -> str:
    """Write <out>/<name>.nii.gz and its final label; returns a one-line summary."""
    image = sitk.ReadImage(str(image_nrrd))
    label = sitk.ReadImage(str(label_nrrd))
    if label.GetSize() != image.GetSize():
        raise SystemExit(f"{name}: label size {label.GetSize()} != image size {image.GetSize()}")
    arr = sitk.GetArrayFromImage(label)
    values = sorted(int(v) for v in np.unique(arr) if v != 0)
    # keep several labels if the file has them, otherwise a binary 0/1 mask
    arr = (arr > 0).astype(np.uint8) if len(values) <= 1 else arr.astype(np.uint8)
    fixed = sitk.GetImageFromArray(arr)
    fixed.CopyInformation(image)  # same grid by construction (the NRRD headers differ only by float noise)
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(out / f"{name}.nii.gz"), useCompression=True)
    sitk.WriteImage(fixed, str(out / "labels" / "final" / f"{name}.nii.gz"), useCompression=True)
    labelled = np.nonzero(arr.any(axis=(1, 2)))[0]
    span = f"{labelled.min()}..{labelled.max()}" if labelled.size else "-"
    return (
        f"{name}: size {image.GetSize()} spacing {tuple(round(s, 3) for s in image.GetSpacing())} "
        f"label values {values or [1]} voxels {int((arr > 0).sum())} on {labelled.size} slices (k {span})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=REPO / "demo" / "studies")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "demo")
    ap.add_argument("--force", action="store_true", help="rebuild cases that exist already")
    args = ap.parse_args(argv)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    archive = fetch_archive(args.cache)
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory() as tmp:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/data/" in m.name and m.name.endswith(".nrrd")}
        cases = sorted(n[: -len("_image.nrrd")] for n in members if n.endswith("_image.nrrd"))
        cases = [c for c in cases if f"{c}_label.nrrd" in members]
        for case in cases:
            done = (out / f"{case}.nii.gz").exists() and (out / "labels" / "final" / f"{case}.nii.gz").exists()
            if done and not args.force:
                print(f"{case}: already there")
                continue
            paths = []
            for suffix in ("image", "label"):
                member = members[f"{case}_{suffix}.nrrd"]
                member.name = Path(member.name).name  # extract flat, never outside tmp
                tar.extract(member, tmp, filter="data")
                paths.append(Path(tmp) / member.name)
            print(convert_case(paths[0], paths[1], out, case), flush=True)
    print(f"demo studies in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
