"""scripts/prepare_demo.py: the real cases of pyradiomics-bhklab's source archive as a MONAI Label studies folder
whose labels LocalDatastore counts as final labels. Uses the repository's archive cache (downloads it once)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monailabel.datastore.local import LocalDatastore

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_demo.py"
CACHE = REPO / ".cache" / "demo"
CASES = {"brain1", "brain2", "breast1", "lung1", "lung2"}

pytestmark = pytest.mark.slow  # runs scripts/prepare_demo.py, which fetches the pyradiomics archive once


def run_script(*args: str) -> str:
    """Run the script; fail with its output (e.g. pip's download error) if it does not succeed."""
    cmd = [sys.executable, str(SCRIPT), "--cache", str(CACHE), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"prepare_demo.py failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_prepare_demo_builds_a_datastore_with_final_labels(tmp_path: Path) -> None:
    """Every case with image + label is listed by LocalDatastore with its final label on the image's grid."""
    out = tmp_path / "studies"
    first = run_script("--output", str(out))
    for case in CASES:
        assert any(line.startswith(f"{case}: shape ") for line in first.splitlines()), first

    again = run_script("--output", str(out))  # idempotent
    assert again.count("already there") == len(CASES), again

    ds = LocalDatastore(str(out), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    listed = {Path(item["image"]).name.removesuffix(".nii.gz"): item for item in ds.datalist()}
    assert set(listed) == CASES
    assert set(ds.get_labeled_images()) == CASES
    for case, item in listed.items():
        assert Path(item["label"]) == out / "labels" / "final" / f"{case}.nii.gz"
        image, label = sitk.ReadImage(item["image"]), sitk.ReadImage(item["label"])
        assert image.GetSize() == label.GetSize()
        assert image.GetOrigin() == label.GetOrigin()
        assert image.GetSpacing() == label.GetSpacing()
        assert image.GetDirection() == label.GetDirection()
        assert label.GetPixelID() == sitk.sitkUInt8
        mask = sitk.GetArrayFromImage(label)
        assert set(np.unique(mask).tolist()) == {0, 1}

    lung2 = sitk.ReadImage(str(out / "lung2.nii.gz"))
    assert lung2.GetSize() == (512, 512, 61)
    assert sitk.GetArrayFromImage(lung2).min() <= -1000  # real CT in HU
    assert int(sitk.GetArrayFromImage(sitk.ReadImage(listed["lung2"]["label"])).sum()) == 24644

    rebuilt = run_script("--output", str(out), "--force")
    assert "already there" not in rebuilt and rebuilt.count(": shape ") == len(CASES)
