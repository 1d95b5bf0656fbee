"""The typed request (lib/engine/request.py): each key read once and checked; a per-request label map (C3)."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from lib.engine.preprocessing import parse_window
from lib.engine.prompts import LabelMap, parse_prompts
from lib.engine.request import EMPTY_STATE, StopOptions, parse_segment_request
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings
from lib.engine.volume_session import SessionCache
from lib.errors import CropUnavailable, PromptError, StateNotHeld
from lib.server.error_handlers import answer
from sam2_testing import FixedModelProvider, blob_volume, small_model

LABELS = LabelMap({"lesion": 1, "organ": 2})
SHAPE = (12, 40, 48)  # (k, j, i)


def test_every_option_is_read_into_its_field():
    raw = {
        "prompts": [{"label": "organ", "slice": 4, "box": [5, 5, 20, 20]}],
        "axis": "coronal",
        "slice_range": [9, 2],
        "client_id": "reader",
        "refine_from": " Last ",
        "scribble_mode": "mask",
        "stop_rule": "on",
        "stop_patience": "4",
        "correction": 1,
        "reset_state": "no",
        "changed_since": "abc.3",
    }
    req = parse_segment_request(raw, 3, LABELS)
    assert req.dimension == 3 and req.labels is LABELS and req.session_name == "reader"
    assert req.axis == 1 and req.slice_range == (2, 9) and req.refine_last and req.scribble_mode == "mask"
    assert req.stop == StopOptions(True, None, 4) and req.correction and not req.reset_state
    assert req.changed_since == "abc.3" and req.history_step is None and req.sends_prompts
    assert parse_segment_request({"annotation_session": "s", "client_id": "c"}, 2, LABELS).session_name == "s"


def test_2d_reads_no_3d_option_and_the_viewer_form_is_typed():
    raw = {"label": "organ", "roi": [30, 10, 8, 2, 5, 5], "slice": "5", "stop_patience": "x", "axis": "oblique"}
    req = parse_segment_request(raw, 2, LABELS)
    assert req.roi == ((10, 30), (2, 8), (5, 5)) and req.key_slice == 5 and req.axis is None
    (p,) = parse_prompts(req, SHAPE).prompts
    assert p.label == "organ" and p.box == (10, 2, 30, 8) and p.slice_index == 5


@pytest.mark.parametrize(
    "raw,dim,words",
    [
        ({"undo": True, "redo": True}, 2, "not both"),
        ({"undo": "maybe"}, 3, "undo must be true or false"),
        ({"changed_since": 5}, 3, "changed_since"),
        ({"changed_since": "x" * 200}, 2, "changed_since"),
        ({"changed_since": "a\nb"}, 2, "changed_since"),
        ({"prompts": [{"slice": 1, "box": [1, 1, 5, 5]}], "slice_range": [1]}, 3, "slice_range"),
        ({"prompts": [{"slice": 1, "box": [1, 1, 5, 5]}], "slice_range": [0, "a"]}, 3, "slice_range"),
        ({"prompts": [7]}, 3, "prompts[0] must be an object"),
        ({"label": "lesion", "roi": [1, 2, 3, 4, 5, 6], "slice": "x"}, 2, "slice"),
        ([1, 2], 3, "JSON object"),
    ],
)
def test_bad_values_are_refused_naming_the_key(raw, dim, words):
    with pytest.raises(PromptError) as err:
        parse_segment_request(raw, dim, LABELS)
    assert words.lower() in str(err.value).lower() and err.value.status == 422


def test_a_slice_range_outside_the_volume_names_the_slice_count():
    req = parse_segment_request({"prompts": [{"slice": 1, "box": [1, 1, 5, 5]}], "slice_range": [3, 12]}, 3, LABELS)
    with pytest.raises(PromptError, match="axial axis has 12 slices") as err:
        parse_prompts(req, SHAPE)
    assert err.value.status == 422
    ok = parse_segment_request({"prompts": [{"slice": 1, "box": [1, 1, 5, 5]}], "slice_range": [0, 11]}, 3, LABELS)
    assert parse_prompts(ok, SHAPE).slice_range == (0, 11)


def test_changed_since_empty_is_a_state_name():
    assert parse_segment_request({"changed_since": EMPTY_STATE}, 3, LABELS).changed_since == "empty"


def test_the_segmenter_resolves_labels_in_the_map_a_request_brings(tmp_path):
    """docs/api.md: the entry points take the label map to use; the settings' map is the default."""
    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(blob_volume(SHAPE, radius=8.0, seed=5)), str(path))
    settings = SegmenterSettings(window=parse_window("abdomen"), labels=LABELS)
    seg = MedSAM2Segmenter(FixedModelProvider(small_model(seed=4)), settings, SessionCache(4, 1 << 30))
    req = {"prompts": [{"label": "liver", "slice": 6, "box": [10, 8, 36, 30]}], "client_id": "c3"}
    with pytest.raises(PromptError, match="Unknown label 'liver'"):
        seg.segment_2d(str(path), req)
    image_labels = LabelMap({"liver": 7, "spleen": 8})
    label, out, _ = seg.segment_2d(str(path), req, labels=image_labels)
    assert out["label_names"] == {"liver": 7, "spleen": 8} and set(label[6].ravel().tolist()) <= {0, 7}
    label3, out3, _ = seg.segment_3d(str(path), {**req, "slice_range": [4, 8]}, labels=image_labels)
    assert out3["label_names"] == {"liver": 7, "spleen": 8} and set(label3.ravel().tolist()) <= {0, 7}
    assert not label3[:4].any() and not label3[9:].any()


def test_the_new_errors_are_answered_with_their_status_and_detail():
    """A crop the region-of-interest tracking cannot form (raised by the engine) is a 422; a state the session does
    not hold a 409; both through the app's one error handler."""
    crop = answer(CropUnavailable("The region of interest around slice 4 leaves the image: send a smaller margin."))
    assert crop.status_code == 422 and "smaller margin" in json.loads(crop.body)["detail"]
    held = answer(StateNotHeld("abc.4"))
    assert held.status_code == 409 and "without changed_since" in json.loads(held.body)["detail"]
