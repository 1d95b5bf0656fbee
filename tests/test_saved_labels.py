"""Saved labels and label names per image (docs/api.md): names kept on disk per image, checked against what a DICOM
SEG and a PACS take; every save of a label keeps the earlier version; ``GET /medsam2/labels/{image}`` lists them
with the ``refine_from`` value that refines each, and a refinement from a label on another grid is a 422 naming
both grids. The local datastore here; the same on Orthanc: tests/test_pacs_demo.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from conftest import Server, write_image
from lib.errors import Unprocessable
from lib.storage.image_labels import image_labels
from lib.storage.label_catalog import LabelNames, check_label_name, names_in_label
from lib.storage.local_datastore import CineLocalDatastore
from sam2_testing import blob_volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
BAD_NAMES = ["", "   ", "x" * 65, "liver/left", "tumour\\1", "naïve", "a;b", "50%"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_a_seg_or_pacs_refuses_is_a_422_saying_what_a_name_may_hold(name):
    with pytest.raises(Unprocessable, match="letters, digits|64"):
        check_label_name(name)


def test_added_names_are_kept_on_disk_with_one_value_per_name_across_images(tmp_path):
    names = LabelNames(tmp_path, {"lesion": 1, "organ": 2})
    assert names.add("a", "liver (left)") == {"lesion": 1, "organ": 2, "liver (left)": 3}
    other_client = LabelNames(tmp_path, {"lesion": 1, "organ": 2})  # another process on the same folder
    assert other_client.of_image("a")["liver (left)"] == 3
    assert other_client.add("a", "LIVER (left)") == names.of_image("a")  # the same name, not a second one
    assert other_client.add("b", "kidney")["kidney"] == 4
    assert names.add("b", "liver (left)")["liver (left)"] == 3  # the value it got first
    assert names.of_image("c") == {"lesion": 1, "organ": 2}
    assert names.added_by_image() == {"a": ["liver (left)"], "b": ["kidney", "liver (left)"]}


def test_a_label_whose_header_declares_billions_of_voxels_is_not_read_to_list_its_names(tmp_path):
    from test_fuzz_uploads import huge_header_nifti

    (tmp_path / "huge.nii").write_bytes(huge_header_nifti())
    assert names_in_label(str(tmp_path / "huge.nii"), {"lesion": 1}) == []


def label_file(path: Path, image: sitk.Image, value: int, shift: int = 0) -> Path:
    arr = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    arr[4:10, 20 + shift : 40 + shift, 30:50] = value
    label = sitk.GetImageFromArray(arr)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(path))
    return path


def test_saving_a_label_again_keeps_the_earlier_version_and_both_are_listed_newest_first(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    image = write_image(blob_volume((16, 64, 64)), studies / "img.nii.gz", (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    store = CineLocalDatastore(str(studies), extensions=["*.nii.gz"])
    store.keep_label_names({"lesion": 1})
    store.names_store.add("img", "liver")
    store.save_label("img", str(label_file(tmp_path / "one.nii.gz", image, 2)), "final", {})
    store.save_label("img", str(label_file(tmp_path / "two.nii.gz", image, 2, shift=5)), "final", {})
    listed = image_labels(store, "img")
    assert listed["names"] == ["lesion", "liver"]
    assert [(s["tag"], s["version"], s["refine_from"], s["names"]) for s in listed["saved"]] == [
        ("final", 2, "final", ["liver"]),
        ("final", 1, "final-v1", ["liver"]),
    ]
    first = sitk.GetArrayFromImage(sitk.ReadImage(store.get_label_uri("img", "final-v1")))
    assert first[4, 20, 30] == 2 and first[4, 60, 30] == 0  # the first save's voxels, unchanged
    again = CineLocalDatastore(str(studies), extensions=["*.nii.gz"])  # a restart reads both from the folder
    assert {"final", "final-v1"} <= set(again.saved_label_files("img"))


# ----- through the server (the shared session server, test studies; tag "reviewed": other tests use "final") -----


def put_label(server: Server, image_id: str, tag: str, path: Path) -> None:
    with open(path, "rb") as f:
        r = requests.put(
            f"{server.url}/datastore/label?image={image_id}&tag={tag}", files={"label": (path.name, f)}, timeout=60
        )
    assert r.status_code == 200, r.text


def test_label_routes_on_a_local_datastore(server, studies, tmp_path):
    first = server.post("/medsam2/labels/ct_blob/names", json={"name": "liver"})
    assert first.status_code == 200, first.text
    assert "liver" in first.json()["names"]
    assert server.get("/medsam2/labels/ct_blob").json()["names"] == first.json()["names"]  # a second client
    info = server.get("/info/").json()
    assert info["label_names"]["images"]["ct_blob"] == ["liver"]
    liver = info["label_names"]["added"]["liver"]
    assert info["models"]["medsam2_3d"]["labels"]["liver"] == liver  # the Slicer plugin's label list
    for bad in ("liver/left", "x" * 65, ""):
        r = server.post("/medsam2/labels/ct_blob/names", json={"name": bad})
        assert r.status_code == 422, r.text
        assert "letters, digits" in r.json()["detail"] or "64" in r.json()["detail"], r.text
    assert server.post("/medsam2/labels/ct_blob/names", data=b"{not json").status_code == 422
    assert server.get("/medsam2/labels/no_such_image").status_code == 404

    image = sitk.ReadImage(str(studies / "ct_blob.nii.gz"))
    put_label(server, "ct_blob", "reviewed", label_file(tmp_path / "a.nii.gz", image, liver))
    put_label(server, "ct_blob", "reviewed", label_file(tmp_path / "b.nii.gz", image, liver, shift=10))
    saved = [s for s in server.get("/medsam2/labels/ct_blob").json()["saved"] if s["tag"] == "reviewed"]
    assert [(s["version"], s["refine_from"], s["source"], s["names"]) for s in saved] == [
        (2, "reviewed", "local", ["liver"]),
        (1, "reviewed-v1", "local", ["liver"]),
    ]

    # refine the older version with a prompt on the added name
    prompt = {"label": "liver", "slice": 6, "box": [30, 22, 50, 38]}
    params = {"prompts": [prompt], "refine_from": saved[1]["refine_from"], "slice_range": [5, 7]}
    r = server.post("/infer/medsam2_3d?image=ct_blob&output=json", data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text
    assert r.json()["label_names"]["liver"] == liver

    # a saved label on another grid: 422 naming both grids
    other = sitk.Image([40, 40, 8], sitk.sitkUInt8)
    sitk.WriteImage(other, str(tmp_path / "other.nii.gz"))
    put_label(server, "ct_blob", "othergrid", tmp_path / "other.nii.gz")
    params = {"prompts": [prompt], "refine_from": "othergrid"}
    r = server.post("/infer/medsam2_3d?image=ct_blob&output=json", data={"params": json.dumps(params)})
    assert r.status_code == 422, r.text
    assert "40x40x8 voxels" in r.json()["detail"] and "96x80x16 voxels" in r.json()["detail"]
