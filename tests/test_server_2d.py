"""End to end: the real MONAI Label server, requests shaped like 3D Slicer's, bad input answered with 4xx."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import SimpleITK as sitk

SLICER_2D = {"label": "lesion", "foreground": [], "background": [], "client_id": "user-xyz"}


def infer(server, model, image, params, output="all"):
    return server.post(f"/infer/{model}?image={image}&output={output}", data={"params": json.dumps(params)})


def split_multipart(response):
    """(label image, result json) from MONAI Label's output=all multipart answer."""
    boundary = response.headers["content-type"].split("boundary=")[1].encode()
    parts = [p for p in response.content.split(b"--" + boundary) if p.strip(b"-\r\n")]
    result, label = None, None
    for part in parts:
        head, _, body = part.partition(b"\r\n\r\n")
        body = body.rstrip(b"\r\n")
        if b"application/json" in head:
            result = json.loads(body)
        elif body:
            with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as f:
                f.write(body)
            label = sitk.ReadImage(f.name)
    return label, result


def test_info_lists_only_medsam2_models(server):
    info = server.get("/info/").json()
    assert set(info["models"]) == {"medsam2_2d", "medsam2_3d", "medsam2_scribbles"}
    assert info["models"]["medsam2_scribbles"]["type"] == "scribbles"
    assert "sam_2d" not in info["models"] and "sam_3d" not in info["models"]
    assert info["models"]["medsam2_2d"]["dimension"] == 2
    assert info["models"]["medsam2_3d"]["dimension"] == 3
    assert info["models"]["medsam2_2d"]["labels"]["lesion"] == 1
    assert info["checkpoints"]["medsam2"]["random_weights"] is False


def test_slicer_2d_box_returns_aligned_label_on_one_slice(server, studies):
    # IJK roi with reversed pairs, as Slicer builds it from a RAS box on a flipped volume
    params = dict(SLICER_2D, roi=[70, 30, 60, 20, 9, 5], slice=7)
    r = infer(server, "medsam2_2d", "ct_blob", params)
    assert r.status_code == 200, r.text
    label, result = split_multipart(r)
    image = sitk.ReadImage(str(studies / "ct_blob.nii.gz"))
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetSpacing(), image.GetSpacing())
    assert np.allclose(label.GetOrigin(), image.GetOrigin())
    assert np.allclose(label.GetDirection(), image.GetDirection())
    arr = sitk.GetArrayFromImage(label)  # (k, j, i)
    labelled_slices = sorted(set(np.nonzero(arr)[0].tolist()))
    assert labelled_slices == [7], labelled_slices
    assert set(np.unique(arr).tolist()) == {0, 1}
    prompt = result["prompts"][0]
    assert prompt["slice"] == 7 and prompt["label"] == "lesion"
    assert prompt["box"] == [30, 20, 70, 60]  # sorted, x = i, y = j
    for stage in ("encode", "decode", "total"):
        assert stage in result["latencies"]
    assert result["session"]["reused"] is False or result["slice_encoded_before"] in (True, False)


def test_second_box_on_same_image_reuses_the_encoded_slice(server):
    first = infer(server, "medsam2_2d", "ct_blob", dict(SLICER_2D, roi=[10, 50, 10, 50, 3, 3], slice=3))
    assert first.status_code == 200, first.text
    second = infer(
        server,
        "medsam2_2d",
        "ct_blob",
        dict(SLICER_2D, roi=[20, 60, 15, 55, 3, 3], slice=3, foreground=[[40, 35, 3]], background=[[5, 5, 9]]),
    )
    assert second.status_code == 200, second.text
    _, result = split_multipart(second)
    assert result["session"]["reused"] is True
    assert result["slice_encoded_before"] is True
    assert result["prompts"][0]["foreground"] == [[40, 35]]
    assert result["prompts"][0]["background"] == []  # the click on slice 9 is not part of slice 3's prompt
    assert any("other slices" in n for n in result["notes"])


def test_native_prompt_form_and_label_by_value(server):
    params = {"prompts": [{"label": 2, "slice": 8, "box": [20, 15, 70, 60], "foreground": [[45, 40]]}]}
    r = infer(server, "medsam2_2d", "ct_blob", params)
    assert r.status_code == 200, r.text
    label, result = split_multipart(r)
    arr = sitk.GetArrayFromImage(label)
    assert set(np.unique(arr).tolist()) <= {0, 2}
    assert sorted(set(np.nonzero(arr)[0].tolist())) == [8]
    assert result["prompts"][0]["label"] == "organ"


def test_2d_image(server):
    r = infer(server, "medsam2_2d", "xray_2d", dict(SLICER_2D, roi=[10, 50, 12, 48, 0, 0], slice=0))
    assert r.status_code == 200, r.text
    label, _ = split_multipart(r)
    assert label.GetSize()[:2] == (64, 64)


BAD_REQUESTS = [
    ("box outside the image", "ct_blob", dict(SLICER_2D, roi=[500, 600, 500, 600, 5, 5], slice=5), 422, "outside"),
    ("zero-size box", "ct_blob", dict(SLICER_2D, roi=[30, 30, 10, 40, 5, 5], slice=5), 422, "zero width"),
    ("slice out of range", "ct_blob", dict(SLICER_2D, foreground=[[20, 20, 99]], slice=99), 422, "outside the image"),
    ("negative slice", "ct_blob", dict(SLICER_2D, roi=[10, 40, 10, 40, -3, -3], slice=-3), 422, "outside the image"),
    ("no prompt at all", "ct_blob", dict(SLICER_2D, slice=5), 422, "No prompt"),
    ("unknown label", "ct_blob", dict(SLICER_2D, label="spleen", roi=[10, 40, 10, 40, 5, 5], slice=5), 422, "spleen"),
    ("NaN in a box", "ct_blob", {"prompts": [{"slice": 2, "box": [1, 2, "nan", 4]}]}, 422, "finite"),
    ("text as coordinates", "ct_blob", dict(SLICER_2D, foreground=[["a", 1, 2]], slice=2), 422, "number"),
    ("unreadable image", "broken", dict(SLICER_2D, roi=[10, 40, 10, 40, 0, 0], slice=0), 415, "cannot be read"),
    ("unknown image id", "no_such_image", dict(SLICER_2D, roi=[10, 40, 10, 40, 0, 0], slice=0), 404, "not found"),
    ("server file path as image id", "/etc/passwd", dict(SLICER_2D, roi=[1, 4, 1, 4, 0, 0], slice=0), 400, "path"),
]


@pytest.mark.parametrize("what,image,params,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, what, image, params, status, words):
    r = infer(server, "medsam2_2d", image, params)
    assert r.status_code == status, (what, r.status_code, r.text)
    detail = r.json()["detail"]
    assert words.lower() in detail.lower(), detail
    assert "Traceback" not in r.text
    assert server.alive()


def test_malformed_params_json_is_a_4xx(server):
    r = server.post("/infer/medsam2_2d?image=ct_blob", data={"params": "{not json"})
    assert 400 <= r.status_code < 500, r.text
    assert server.alive()
