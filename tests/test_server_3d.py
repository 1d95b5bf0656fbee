"""End to end 3D: Slicer- and OHIF-shaped propagation requests, sessions, and bad input, on the real server."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from test_server_2d import infer, split_multipart


def test_slicer_3d_roi_bounds_propagation_and_label_is_aligned(server, studies):
    params = {"label": "lesion", "roi": [70, 30, 60, 20, 12, 4], "foreground": [], "background": [], "client_id": "s1"}
    r = infer(server, "medsam2_3d", "ct_blob", params)
    assert r.status_code == 200, r.text
    label, result = split_multipart(r)
    image = sitk.ReadImage(str(studies / "ct_blob.nii.gz"))
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetDirection(), image.GetDirection()) and np.allclose(label.GetOrigin(), image.GetOrigin())
    arr = sitk.GetArrayFromImage(label)
    slices = np.nonzero(arr.any(axis=(1, 2)))[0]
    assert slices.size and slices.min() >= 4 and slices.max() <= 12
    cov = result["coverage"]["lesion"]
    assert cov["slices_propagated"] == [4, 12] and cov["num_slices_propagated"] == 9
    assert result["prompts"][0]["slice"] == 8  # the ROI's middle slice is the key slice
    assert {"encode", "track", "total"} <= set(result["latencies"])


def test_ohif_clicks_only_propagate_through_the_whole_volume(server):
    # OHIF's MONAI Label panel sends voxel clicks only: their slice is the key slice
    params = {"label": "organ", "foreground": [[48, 40, 6]], "background": [[5, 5, 6]], "client_id": "ohif-1"}
    r = infer(server, "medsam2_3d", "ct_blob", params)
    assert r.status_code == 200, r.text
    label, result = split_multipart(r)
    assert result["coverage"]["organ"]["num_slices_propagated"] == 16
    assert result["prompts"][0]["slice"] == 6 and result["prompts"][0]["foreground"] == [[48, 40]]
    assert set(np.unique(sitk.GetArrayFromImage(label)).tolist()) <= {0, 2}


def test_follow_up_adds_a_label_without_reencoding_and_reset_starts_over(server):
    first = infer(server, "medsam2_3d", "ct_blob", {"label": "lesion", "foreground": [[48, 40, 8]], "client_id": "fu"})
    assert first.status_code == 200, first.text
    _, r1 = split_multipart(first)
    second = infer(server, "medsam2_3d", "ct_blob", {"label": "organ", "foreground": [[50, 45, 3]], "client_id": "fu"})
    _, r2 = split_multipart(second)
    assert r2["session"]["reused"]
    assert r2["session"]["slices_encoded_total"] == r1["session"]["slices_encoded_total"] == 16
    # none again: every slice the follow-up needs was encoded when it came (the first request may have found the
    # image encoded already, by encode-ahead or an earlier test, so its encode time can be 0.0 as well)
    assert r2["session"]["ready_at_request"] == {"slices": 16, "needed": 16} and r2["latencies"]["encode"] < 0.05
    assert r2["session"]["labels_recomputed"] == ["organ"]  # lesion's answer is kept as it was
    assert sorted(p["label"] for p in r2["prompts_in_session"]) == ["lesion", "organ"]
    assert sorted(r2["coverage"]) == ["lesion", "organ"]
    third = infer(
        server,
        "medsam2_3d",
        "ct_blob",
        {"label": "organ", "foreground": [[50, 45, 3]], "client_id": "fu", "reset_state": True},
    )
    _, r3 = split_multipart(third)
    assert [p["label"] for p in r3["prompts_in_session"]] == ["organ"]


def test_sagittal_axis(server, studies):
    params = {
        "prompts": [{"label": "lesion", "slice": 48, "box": [20, 4, 60, 12]}],
        "axis": "sagittal",
        "client_id": "ax",
    }
    r = infer(server, "medsam2_3d", "ct_blob", params)
    assert r.status_code == 200, r.text
    label, result = split_multipart(r)
    assert result["axis"] == "sagittal" and result["coverage"]["lesion"]["num_slices_propagated"] == 96
    assert label.GetSize() == sitk.ReadImage(str(studies / "ct_blob.nii.gz")).GetSize()


def test_confidence_stop_rule_and_a_correction_through_the_server(server):
    params = {"prompts": [{"label": "lesion", "slice": 8, "box": [30, 20, 70, 60]}], "client_id": "guide"}
    r = infer(server, "medsam2_3d", "ct_blob", params)
    assert r.status_code == 200, r.text
    _, result = split_multipart(r)
    assert set(result["confidence"]["lesion"]) == {str(k) for k in range(16)}
    assert all(0 <= v <= 1 for v in result["confidence"]["lesion"].values())
    picks = result["check_slices"]["lesion"]
    assert picks and all(p["slice"] != 8 and p["reason"] for p in picks) and "lesion: slices" in result["hint"]
    # the user corrects the first slice worth checking: it joins the session's key slices and all re-propagates
    fix = {"prompts": [{"label": "lesion", "slice": picks[0]["slice"], "foreground": [[50, 40]]}]}
    r = infer(server, "medsam2_3d", "ct_blob", {**fix, "correction": True, "client_id": "guide"})
    assert r.status_code == 200, r.text
    _, corrected = split_multipart(r)
    assert sorted(p["slice"] for p in corrected["prompts_in_session"]) == sorted({8, picks[0]["slice"]})
    assert corrected["session"]["reused"] and corrected["coverage"]["lesion"]["num_slices_propagated"] == 16
    assert "warnings" not in corrected
    # the stop rule, turned on by the request: a threshold no slice reaches ends both passes after 2 slices
    stop = {**params, "stop_rule": True, "stop_min_object_score": 100, "stop_patience": 2}
    r = infer(server, "medsam2_3d", "ct_blob", stop)
    assert r.status_code == 200, r.text
    label, stopped = split_multipart(r)
    assert stopped["coverage"]["lesion"]["stopped_at"] == {"forward": 9, "backward": 7}
    assert stopped["stop_rule"] == {"min_object_score": 100.0, "patience": 2}
    slices = np.nonzero(sitk.GetArrayFromImage(label).any(axis=(1, 2)))[0]
    assert set(slices.tolist()) <= {8}


BAD_3D = [
    ("key slice outside the volume", "ct_blob", {"prompts": [{"slice": 40, "box": [1, 1, 30, 30]}]}, 422, "outside"),
    ("click below the first slice", "ct_blob", {"foreground": [[10, 10, -1]]}, 422, "outside"),
    ("degenerate box", "ct_blob", {"prompts": [{"slice": 3, "box": [10, 10, 10, 30]}]}, 422, "zero width"),
    ("2D image to the 3D model", "xray_2d", {"foreground": [[10, 10, 0]]}, 422, "2D model"),
    ("unknown axis", "ct_blob", {"foreground": [[10, 10, 2]], "axis": "oblique"}, 422, "axis"),
    ("stop patience zero", "ct_blob", {"foreground": [[10, 10, 2]], "stop_patience": 0}, 422, "stop_patience"),
    ("stop rule not a flag", "ct_blob", {"foreground": [[10, 10, 2]], "stop_rule": "maybe"}, 422, "true or false"),
    ("correction not a flag", "ct_blob", {"foreground": [[10, 10, 2]], "correction": [1]}, 422, "correction"),
]


@pytest.mark.parametrize("what,image,params,status,words", BAD_3D, ids=[b[0] for b in BAD_3D])
def test_bad_3d_input(server, what, image, params, status, words):
    r = infer(server, "medsam2_3d", image, params)
    assert r.status_code == status, (what, r.status_code, r.text)
    assert words.lower() in r.json()["detail"].lower()
    assert server.alive()
