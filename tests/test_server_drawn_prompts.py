"""Scribbles, lassos, refining a saved or uploaded label, and undo/redo, through the real server."""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from test_server_2d import infer, split_multipart

LASSO = [[30, 20], [70, 20], [70, 60], [30, 60]]
SCRIBBLE = [[40, 40], [50, 42], [60, 40]]


def _labels(response) -> tuple[np.ndarray, dict]:
    assert response.status_code == 200, response.text
    label, result = split_multipart(response)
    return sitk.GetArrayFromImage(label), result


def _label_file(studies, array: np.ndarray, suffix: str = ".nii.gz") -> str:
    ref = sitk.ReadImage(str(studies / "ct_blob.nii.gz"))
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(ref)
    path = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
    sitk.WriteImage(image, path)
    return path


def _infer_with_label(server, model, params, label_path, image="ct_blob"):
    with open(label_path, "rb") as f:
        return server.post(
            f"/infer/{model}?image={image}&output=all",
            data={"params": json.dumps(params)},
            files={"label": ("label.nii.gz", f)},
        )


def test_every_prompt_kind_in_one_2d_request(server):
    prompts = [
        {"label": "lesion", "slice": 8, "box": [30, 20, 70, 60], "foreground": [[50, 40]]},
        {"label": "organ", "slice": 8, "foreground_lasso": [LASSO], "background_scribbles": [[[5, 5], [9, 9]]]},
    ]
    label, result = _labels(infer(server, "medsam2_2d", "ct_blob", {"prompts": prompts, "client_id": "kinds"}))
    assert not label[np.arange(16) != 8].any()
    assert result["prompts"][1]["foreground_lasso"] == [LASSO]
    scribbled = {"prompts": [{"label": "lesion", "slice": 3, "foreground_scribbles": [SCRIBBLE]}], "client_id": "k2"}
    label, result = _labels(infer(server, "medsam2_2d", "ct_blob", scribbled))
    assert result["prompts"][0]["foreground_scribbles"] == [SCRIBBLE]
    assert set(np.unique(label[3])) <= {0, 1} and not label[np.arange(16) != 3].any()


def test_3d_lasso_and_scribbles_propagate_and_the_lasso_slice_is_what_was_drawn(server):
    prompts = [
        {"label": "organ", "slice": 5, "foreground_lasso": [LASSO]},
        {"label": "lesion", "slice": 10, "foreground_scribbles": [SCRIBBLE], "background_scribbles": [[[2, 2]]]},
    ]
    for mode in ("points", "mask"):
        params = {"prompts": prompts, "client_id": f"3d-{mode}", "scribble_mode": mode}
        label, result = _labels(infer(server, "medsam2_3d", "ct_blob", params))
        assert result["coverage"]["organ"]["num_slices_propagated"] == 16
        assert result["coverage"]["lesion"]["num_slices_propagated"] == 16
        drawn = np.zeros((80, 96), bool)
        drawn[20:61, 30:71] = True
        organ = label[5] == 2
        assert (organ == drawn).mean() > 0.97  # SAM2's mask prompt, resized to its input and back


def test_refine_a_saved_label_changes_only_the_corrected_slice_then_undo_and_redo(server, studies):
    base = np.zeros((16, 80, 96), np.uint8)
    base[4:12, 25:55, 35:65] = 1
    path = _label_file(studies, base)
    with open(path, "rb") as f:  # a label tag of its own, so other tests' datastore stays as they expect
        saved = requests.put(
            f"{server.url}/datastore/label?image=ct_blob&tag=draft", files={"label": ("l.nii.gz", f)}, timeout=60
        )
    assert saved.status_code == 200, saved.text
    fix = {"label": "lesion", "slice": 7, "background_lasso": [[[30, 20], [70, 20], [70, 38], [30, 38]]]}
    params = {"prompts": [fix], "refine_from": "draft", "client_id": "refiner"}
    label, result = _labels(infer(server, "medsam2_3d", "ct_blob", params))
    assert result["refined_from"] == "draft" and result["changed_slices"] == {"lesion": [7, 7]}
    others = np.arange(16) != 7
    assert (label[others] == base[others]).all() and not (label[7, 20:38, 35:65] == 1).any()
    assert result["history"]["can_undo"]
    # undo: back to the state before the refine (nothing in this session yet), then redo the refine
    undone, info = _labels(infer(server, "medsam2_3d", "ct_blob", {"undo": True, "client_id": "refiner"}))
    assert not undone.any() and info["undo"] and info["history"]["can_redo"]
    redone, _ = _labels(infer(server, "medsam2_3d", "ct_blob", {"redo": True, "client_id": "refiner"}))
    assert (redone == label).all()


def test_undo_goes_back_ten_levels_and_sessions_do_not_undo_each_other(server):
    def edit(client, n):
        fix = {"label": "lesion", "slice": 2 + n % 12, "foreground": [[40 + n, 40]]}
        params = {"prompts": [fix], "correction": n > 0, "client_id": client}
        return _labels(infer(server, "medsam2_2d", "ct_blob", params))[0]

    answers = {"alice": [], "bob": []}
    with ThreadPoolExecutor(2) as pool:  # two annotators on the same image at once
        for n in range(11):
            for who, fut in [(w, pool.submit(edit, w, n)) for w in answers]:
                answers[who].append(fut.result())
    for n in range(9, -1, -1):  # ten undos, each restoring the answer before
        label, info = _labels(infer(server, "medsam2_2d", "ct_blob", {"undo": True, "client_id": "alice"}))
        assert (label == answers["alice"][n]).all(), n
    assert info["history"]["undo_levels"] == 1
    # bob's session is untouched by alice's undos
    label, _ = _labels(infer(server, "medsam2_2d", "ct_blob", {"undo": True, "client_id": "bob"}))
    assert (label == answers["bob"][9]).all()


def test_slicer_style_scribble_upload_refines_the_segment(server, studies):
    """Slicer's scribbles: all segments exported into one label map, named in label_info (plugin lines 1976-2033)."""
    upload = np.zeros((16, 80, 96), np.uint8)
    upload[6:10, 30:50, 40:60] = 1  # the "organ" segment
    upload[8, 60:62, 20:40] = 2  # background_scribbles
    upload[8, 40, 45:58] = 3  # foreground_scribbles
    params = {
        "label_info": [
            {"name": "organ", "id": 1},
            {"name": "background_scribbles", "id": 2},
            {"name": "foreground_scribbles", "id": 3},
        ],
        "selected_label_name": "organ",
        "roi": [],
        "scribble_mode": "points",
        "client_id": "slicer-scribbles",
    }
    label, result = _labels(_infer_with_label(server, "medsam2_scribbles", params, _label_file(studies, upload)))
    assert result["label_values"] == {"organ": 1} and set(np.unique(label)) <= {0, 1}
    assert result["changed_slices"] == {"organ": [8, 8]}
    others = np.arange(16) != 8
    assert (label[others] == (upload[others] == 1)).all()  # accepted slices come back as they were sent


BAD = [
    (
        "self-crossing lasso",
        {"prompts": [{"slice": 3, "foreground_lasso": [[[0, 0], [40, 40], [40, 0], [0, 40]]]}]},
        422,
        "crosses itself",
    ),
    ("degenerate lasso", {"prompts": [{"slice": 3, "foreground_lasso": [[[1, 1], [5, 5]]]}]}, 422, "at least 3"),
    (
        "scribble off the slice",
        {"prompts": [{"slice": 3, "foreground_scribbles": [[[1, 1], [500, 5]]]}]},
        422,
        "outside",
    ),
    ("background only", {"prompts": [{"slice": 3, "background_scribbles": [[[1, 1]]]}]}, 422, "only background"),
    (
        "unknown scribble mode",
        {"prompts": [{"slice": 3, "foreground_scribbles": [[[1, 1]]]}], "scribble_mode": "brush"},
        422,
        "scribble_mode",
    ),
    ("undo with nothing to undo", {"undo": True, "client_id": "nobody-yet"}, 422, "nothing to undo"),
    ("redo with nothing to redo", {"redo": True, "client_id": "nobody-yet-2"}, 422, "nothing to redo"),
    ("undo and redo", {"undo": True, "redo": True}, 422, "not both"),
    (
        "refine from a missing label",
        {"prompts": [{"slice": 3, "box": [1, 1, 30, 30]}], "refine_from": "never_saved"},
        404,
        "no 'never_saved' label",
    ),
    (
        "refine from a bad tag",
        {"prompts": [{"slice": 3, "box": [1, 1, 30, 30]}], "refine_from": "../x"},
        400,
        "label tag",
    ),
    (
        "refine from last with no answer",
        {"prompts": [{"slice": 3, "box": [1, 1, 30, 30]}], "refine_from": "last", "client_id": "fresh"},
        404,
        "no answer",
    ),
]


@pytest.mark.parametrize("what,params,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_drawn_prompts_and_history_requests(server, what, params, status, words):
    params = {"client_id": f"bad {what}", **params}  # a session of its own: other tests' sessions are not its input
    r = infer(server, "medsam2_3d", "ct_blob", params)
    assert r.status_code == status, (what, r.status_code, r.text)
    assert words.lower() in r.json()["detail"].lower()


def test_bad_label_uploads_leave_the_session_as_it_was(server, studies):
    client = {"client_id": "uploads"}
    good = {"prompts": [{"label": "lesion", "slice": 8, "box": [30, 20, 70, 60]}], **client}
    first, _ = _labels(infer(server, "medsam2_3d", "ct_blob", good))
    wrong_shape = sitk.GetImageFromArray(np.zeros((16, 80, 95), np.uint8))
    bad_shape = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
    sitk.WriteImage(wrong_shape, bad_shape)
    moved = sitk.ReadImage(_label_file(studies, np.zeros((16, 80, 96), np.uint8)))
    moved.SetOrigin((0.0, 0.0, 0.0))
    bad_origin = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
    sitk.WriteImage(moved, bad_origin)
    strange = np.zeros((16, 80, 96), np.uint8)
    strange[3, 3, 3] = 9
    not_an_image = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
    with open(not_an_image, "wb") as f:
        f.write(b"not a label" * 20)
    cases = [
        (bad_shape, 422, "voxels"),
        (bad_origin, 422, "origin"),
        (_label_file(studies, strange), 422, "values [9]"),
        (not_an_image, 422, "cannot be read"),
    ]
    for path, status, words in cases:
        r = _infer_with_label(server, "medsam2_3d", {**good, "correction": True}, path)
        assert r.status_code == status and words in r.json()["detail"], (path, r.text)
    empty = {"selected_label_name": "lesion", **client}
    r = _infer_with_label(server, "medsam2_scribbles", empty, _label_file(studies, np.zeros((16, 80, 96), np.uint8)))
    assert r.status_code == 422 and "no scribbles" in r.json()["detail"]
    r = infer(server, "medsam2_scribbles", "ct_blob", empty)
    assert r.status_code == 422 and "needs the scribbles" in r.json()["detail"]
    # the session is as it was: undo goes back to before the one good request
    label, info = _labels(infer(server, "medsam2_3d", "ct_blob", {"undo": True, **client}))
    assert not label.any() and info["history"] == {
        "can_undo": False,
        "can_redo": True,
        "undo_levels": 0,
        "redo_levels": 1,
    }
    redone, _ = _labels(infer(server, "medsam2_3d", "ct_blob", {"redo": True, **client}))
    assert (redone == first).all()
    assert server.alive()
