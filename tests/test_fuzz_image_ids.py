"""Path-like and unknown image ids, in every place a request can carry one, and label saves with path-like ids
or tags: refused with a clear 4xx; nothing outside the datastore is read or written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from fuzz_testing import (
    CASES,
    FUZZ,
    assert_refused,
    check_alive,
    infer,
    post,
    url_text,
)
from hypothesis import given
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Path:
    """A valid image outside the datastore (under the temp folder, where MONAI Label puts uploads)."""
    path = tmp_path_factory.mktemp("outside") / "canary.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 32, 32), 100, np.int16)), str(path))
    return path


def path_like_ids(canary: Path, studies: Path) -> list[str]:
    rel_from_repo = os.path.relpath(canary, Path.cwd())
    rel_from_studies = os.path.relpath(canary, studies)
    return [
        "../../etc/passwd",
        "/etc/passwd",
        "..%2f..%2fetc%2fpasswd",
        "%2e%2e/%2e%2e/etc/passwd",
        "%252e%252e%252fetc%252fpasswd",
        "..\\..\\etc\\passwd",
        "....//....//etc/passwd",
        "/proc/self/environ",
        "/dev/zero",
        "/dev/urandom",
        "file:///etc/passwd",
        "~/.bashrc",
        str(canary),
        str(canary)[:-7],
        rel_from_repo,
        rel_from_studies,
        "../" + canary.parent.name + "/canary",
        str(studies / "ct_blob.nii.gz"),
        "ct_blob\x00.nii.gz",
        "ct_blob/../ct_blob",
        "./ct_blob",
        ".",
        "..",
        "apps",
        "tests/conftest.py",
        "C:\\Windows\\win.ini",
        "x" * 5000,
    ]


@FUZZ
@given(data=st.data())
def test_path_like_image_ids_never_read_outside_the_datastore(fuzz_server, studies, canary, data):
    known = path_like_ids(canary, studies)
    image = data.draw(
        st.one_of(
            st.sampled_from(known),
            url_text(min_size=1, max_size=30).filter(lambda t: t not in ("ct_blob", "xray_2d", "broken")),
            st.sampled_from(known).map(lambda p: quote(p, safe="")),
        )
    )
    model = data.draw(st.sampled_from(["medsam2_2d", "medsam2_3d"]))
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 3, 3], "slice": 3}
    where = data.draw(st.sampled_from(["query", "params", "raw_query", "session_id"]))
    if where == "query":
        r = infer(fuzz_server, model, params, "image_ids", image=image)
    elif where == "params":
        r = infer(fuzz_server, model, dict(params, image=image), "image_ids")
    elif where == "session_id":
        r = post(
            fuzz_server,
            f"/infer/{model}?session_id={quote(image, safe='')}&output=json",
            "image_ids",
            data={"params": json.dumps(params)},
        )
    else:  # as typed: %2e%2e and friends decoded by the server only
        r = post(
            fuzz_server,
            f"/infer/{model}?image={image.replace('&', '%26').replace('#', '%23')}&output=json",
            "image_ids",
            data={"params": json.dumps(params)},
        )
    # 415 would mean a file was opened and found unreadable: ids never reach files outside the datastore
    detail = assert_refused(r, image[:200], statuses=(400, 404, 422))
    assert "root:" not in detail


def test_each_known_path_is_refused_in_every_place(fuzz_server, studies, canary):
    """The fixed list above, every id in the query, in params and as session_id, for both models."""
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 3, 3], "slice": 3}
    for image in path_like_ids(canary, studies):
        for model in ("medsam2_2d", "medsam2_3d"):
            for r in (
                infer(fuzz_server, model, params, "image_ids", image=image),
                infer(fuzz_server, model, dict(params, image=image), "image_ids"),
                post(
                    fuzz_server,
                    f"/infer/{model}?session_id={quote(image, safe='')}",
                    "image_ids",
                    data={"params": json.dumps(params)},
                ),
            ):
                assert_refused(r, image[:100], statuses=(400, 404))
    check_alive(fuzz_server)
    # the id that names the canary's folder would have been served if paths under the temp folder passed
    r = infer(fuzz_server, "medsam2_2d", params, "image_ids", image=str(canary))
    assert r.status_code == 400 and "path" in r.json()["detail"]


def test_missing_image_unknown_model_and_dicom_seg_output(fuzz_server):
    params = json.dumps({"label": "lesion", "roi": [2, 20, 2, 20, 3, 3], "slice": 3})
    cases = [
        ("/infer/medsam2_2d?output=json", 400, "No image"),
        ("/infer/medsam2_2d?image=&output=json", 400, "No image"),
        ("/infer/no_such_model?image=ct_blob&output=json", 404, "Unknown model"),
        ("/infer/medsam2_2d?image=ct_blob&output=dicom_seg", 400, "dicom_seg"),
        ("/infer/medsam2_2d?image=ct_blob&output=pdf", 422, "output"),
    ]
    for path, status, words in cases:
        r = post(fuzz_server, path, "infer_misc", data={"params": params})
        detail = assert_refused(r, path, statuses=(status,))
        assert words.lower() in detail.lower(), detail
    check_alive(fuzz_server)


# ------------------------------------------------------------------------------------------------- uploads


@pytest.mark.parametrize(
    "query",
    [
        "image=ct_blob&tag=..%2F..%2Fescaped",
        "image=ct_blob&tag=%2Ftmp%2Fescaped",
        "image=ct_blob&tag=.",
        "image=..%2F..%2Fescaped&tag=final",
        "image=%2Ftmp%2Fescaped&tag=final",
    ],
)
def test_label_saves_with_path_like_ids_or_tags_are_refused(fuzz_server, studies, tmp_path, query):
    """``PUT /datastore/label`` joins image id and tag into a path: path-like ones must not write anywhere."""
    label = tmp_path / "label.nii.gz"
    label.write_bytes((studies / "ct_blob.nii.gz").read_bytes())
    before = {p for p in studies.parent.rglob("*escaped*")}
    CASES["datastore label save"] += 1
    with label.open("rb") as f:
        r = requests.put(f"{fuzz_server.url}/datastore/label?{query}", files={"label": ("label.nii.gz", f)}, timeout=30)
    assert_refused(r, query, (400,))
    assert {p for p in studies.parent.rglob("*escaped*")} == before
    assert not Path("/tmp/escaped").exists()


def test_inference_may_not_save_a_final_label(fuzz_server):
    """``/infer`` needs only the user role; a final label is saved by an annotator with PUT /datastore/label."""
    params = {"label": "lesion", "roi": [10, 40, 10, 40, 5, 5], "slice": 5, "save_label": True, "label_tag": "final"}
    detail = assert_refused(infer(fuzz_server, "medsam2_2d", params, "infer save_label"), params, (403,))
    assert "PUT /datastore/label" in detail
