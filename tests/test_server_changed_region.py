"""Changed-region answers through the real server (docs/api.md): a client that applies each box to the label it
holds ends with the whole label a second client receives, voxel for voxel, through 3D, 2D, a correction, undo and
redo, and saves it exactly; a state the session does not hold is a 409; Slicer's clients get whole labels."""

from __future__ import annotations

import json
import tempfile

import nrrd
import numpy as np
import requests
import SimpleITK as sitk
from requests_toolbelt import MultipartDecoder
from test_server_2d import infer, split_multipart

from lib.engine.changed_region import ChangedRegion, apply_region

SHAPE = (16, 80, 96)  # ct_blob, (k, j, i)
# what the OHIF panel sends with every request (docs/api.md): an uncompressed NRRD when the whole label comes back
PANEL = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}
SEQUENCE = [
    ("medsam2_3d", {"prompts": [{"label": "lesion", "slice": 8, "box": [30, 20, 70, 60]}], "slice_range": [4, 12]}),
    ("medsam2_2d", {"prompts": [{"label": "organ", "slice": 3, "box": [10, 10, 40, 40]}]}),
    ("medsam2_3d", {"prompts": [{"label": "organ", "slice": 10, "box": [12, 12, 44, 44]}], "slice_range": [6, 14]}),
    ("medsam2_3d", {"prompts": [{"label": "organ", "slice": 13, "background": [[20, 20]]}], "correction": True}),
    ("medsam2_3d", {"undo": True}),
    ("medsam2_2d", {"undo": True}),
    ("medsam2_3d", {"redo": True}),
]


def parts(response: requests.Response) -> tuple[bytes, dict]:
    """(label file bytes, answer JSON) of an ``output=all`` multipart answer, read as docs/api.md shows."""
    decoded = MultipartDecoder.from_response(response).parts
    answer = json.loads(next(p.text for p in decoded if p.headers[b"Content-Type"] == b"application/json"))
    body = next(p.content for p in decoded if p.headers[b"Content-Type"] != b"application/json")
    return body, answer


def read_region(body: bytes) -> tuple[np.ndarray, dict]:
    """The box as the docs read it, with pynrrd: voxels in (k, j, i) order and the header."""
    with tempfile.NamedTemporaryFile(suffix=".nrrd") as f:
        f.write(body)
        f.flush()
        return nrrd.read(f.name, index_order="C")


def whole_label(server, model: str, params: dict) -> tuple[np.ndarray, dict]:
    r = infer(server, model, "ct_blob", params)
    assert r.status_code == 200, r.text
    label, answer = split_multipart(r)
    return sitk.GetArrayFromImage(label), answer


def test_applied_boxes_give_every_whole_label_and_save_exactly(server, studies):
    held = np.zeros(SHAPE, np.uint8)
    since = "empty"
    for model, params in SEQUENCE:
        whole, whole_answer = whole_label(server, model, {**params, "client_id": "c1-whole"})
        assert "changed_region" not in whole_answer and whole_answer["answer_id"]
        r = infer(server, model, "ct_blob", {**params, **PANEL, "client_id": "c1-boxes", "changed_since": since})
        assert r.status_code == 200, r.text
        body, answer = parts(r)
        assert body.startswith(b"NRRD")
        box, header = read_region(body)
        assert header["type"] == "uint8" and header["encoding"] == "gzip"
        region = ChangedRegion.from_json(answer["changed_region"])
        assert header["medsam2_offset_ijk"] == " ".join(map(str, answer["changed_region"]["offset_ijk"]))
        assert header["medsam2_full_size_ijk"] == "96 80 16" and region.since == since
        assert header["medsam2_answer_id"] == answer["answer_id"]
        apply_region(held, region, box)
        assert np.array_equal(held, whole), (model, params)
        since = answer["answer_id"]
    # the panel saves the label it holds: the datastore keeps exactly the last whole label
    image = sitk.ReadImage(str(studies / "ct_blob.nii.gz"))
    saved = sitk.GetImageFromArray(held)
    saved.CopyInformation(image)
    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as f:
        sitk.WriteImage(saved, f.name)
        with open(f.name, "rb") as upload:
            url = f"{server.url}/datastore/label?image=ct_blob&tag=changed_regions"
            assert requests.put(url, files={"label": ("held.nii.gz", upload)}, timeout=60).status_code == 200
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(studies / "labels" / "changed_regions" / "ct_blob.nii.gz")))
    assert np.array_equal(stored, whole)


def test_a_state_not_held_is_a_409_and_the_request_works_again_without_it(server):
    params = {"prompts": [{"label": "lesion", "slice": 8, "box": [30, 20, 70, 60]}], "client_id": "c1-409", **PANEL}
    first = infer(server, "medsam2_3d", "ct_blob", params, output="json")
    assert first.status_code == 200, first.text
    fix = {**params, "prompts": [{"label": "lesion", "slice": 5, "foreground": [[50, 40]]}], "correction": True}
    for unknown in ("0123abcd.4", "empty.1"):
        r = infer(server, "medsam2_3d", "ct_blob", {**fix, "changed_since": unknown}, output="json")
        assert r.status_code == 409 and "without changed_since" in r.json()["detail"], r.text
    again = infer(server, "medsam2_3d", "ct_blob", fix, output="json").json()
    assert again["history"]["undo_levels"] == 2  # the refused corrections changed nothing
    assert again["answer_id"] != first.json()["answer_id"]


def test_slicer_and_monailabel_clients_keep_whole_labels(server):
    slicer = {"label": "lesion", "roi": [70, 30, 60, 20, 12, 4], "client_id": "c1-slicer", "result_extension": ".nrrd"}
    r = infer(server, "medsam2_3d", "ct_blob", slicer)
    assert r.status_code == 200, r.text
    body, answer = parts(r)
    with tempfile.NamedTemporaryFile(suffix=".nrrd") as f:
        f.write(body)
        f.flush()
        label = sitk.ReadImage(f.name)
    assert label.GetSize() == SHAPE[::-1] and "changed_region" not in answer and answer["answer_id"]


def test_a_slice_range_outside_the_volume_is_a_422_naming_the_slice_count(server):
    params = {"prompts": [{"label": "lesion", "slice": 8, "box": [30, 20, 70, 60]}], "slice_range": [4, 16]}
    r = infer(server, "medsam2_3d", "ct_blob", params, output="json")
    assert r.status_code == 422 and "has 16 slices" in r.json()["detail"], r.text
