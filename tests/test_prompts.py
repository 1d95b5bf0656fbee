"""Prompt parsing: Slicer's IJK ROI (pairs in any order), clicks on other slices, native form, errors."""

from __future__ import annotations

import pytest

from lib.engine.prompts import LabelMap, ijk_to_slice, parse_request, slice_shape
from lib.errors import PromptError

LABELS = LabelMap({"lesion": 1, "organ": 2})
SHAPE = (20, 60, 80)  # (k, j, i)


def test_reversed_roi_pairs_are_sorted_into_a_box():
    parsed = parse_request({"label": "lesion", "roi": [50, 10, 40, 5, 9, 3], "slice": 6}, SHAPE, LABELS, 2)
    (p,) = parsed.prompts
    assert p.box == (10, 5, 50, 40)
    assert p.slice_index == 6 and p.label == "lesion" and p.label_value == 1


def test_2d_keeps_only_clicks_on_the_prompted_slice():
    req = {"label": "organ", "foreground": [[10, 11, 4], [30, 31, 7]], "background": [[2, 3, 4]], "slice": 4}
    (p,) = parse_request(req, SHAPE, LABELS, 2).prompts
    assert p.points == ((10, 11), (2, 3)) and p.point_labels == (1, 0)
    assert p.box is None and p.slice_index == 4


def test_2d_roi_without_slice_uses_roi_middle_and_slicer_mm_offset_is_corrected():
    (p,) = parse_request({"roi": [1, 20, 1, 20, 4, 8]}, SHAPE, LABELS, 2).prompts
    assert p.slice_index == 6
    parsed = parse_request({"roi": [1, 20, 1, 20, 4, 8], "slice": 15}, SHAPE, LABELS, 2)
    assert parsed.prompts[0].slice_index == 6 and parsed.notes


def test_3d_clicks_on_several_slices_become_key_slices_and_roi_bounds_range():
    req = {"label": "lesion", "foreground": [[10, 10, 5], [12, 12, 9]], "roi": [0, 30, 0, 30, 2, 12]}
    parsed = parse_request(req, SHAPE, LABELS, 3)
    assert [p.slice_index for p in parsed.prompts] == [5, 9]
    assert parsed.slice_range == (2, 12)
    assert all(p.box == (0, 0, 30, 30) for p in parsed.prompts)


def test_3d_roi_only_uses_middle_slice():
    parsed = parse_request({"roi": [5, 25, 5, 25, 10, 4]}, SHAPE, LABELS, 3)
    assert [p.slice_index for p in parsed.prompts] == [7]


def test_axes_map_ijk_to_slice_pixels():
    assert ijk_to_slice((1, 2, 3), 2) == (3, 1, 2)
    assert ijk_to_slice((1, 2, 3), 1) == (2, 1, 3)
    assert ijk_to_slice((1, 2, 3), 0) == (1, 2, 3)
    assert slice_shape(SHAPE, 0) == (80, 20, 60)
    parsed = parse_request({"foreground": [[40, 30, 10]], "axis": "coronal"}, SHAPE, LABELS, 3)
    assert parsed.axis == 1 and parsed.prompts[0].slice_index == 30 and parsed.prompts[0].points == ((40, 10),)


def test_box_partially_outside_is_clipped_and_reported():
    parsed = parse_request({"prompts": [{"slice": 1, "box": [-5, 10, 100, 30]}]}, SHAPE, LABELS, 2)
    assert parsed.prompts[0].box == (0, 10, 79, 30) and parsed.notes


def test_label_by_name_value_case_and_default():
    assert LABELS.resolve("Organ") == ("organ", 2)
    assert LABELS.resolve(1) == ("lesion", 1)
    assert LABELS.resolve("2") == ("organ", 2)
    assert LABELS.resolve(None) == ("lesion", 1)


@pytest.mark.parametrize(
    "req,dim,words",
    [
        ({"label": "lesion"}, 2, "No prompt"),
        ({"roi": [1, 2, 3]}, 2, "roi"),
        ({"roi": [100, 200, 100, 200, 1, 1]}, 2, "outside"),
        ({"roi": [5, 5, 1, 40, 1, 1]}, 2, "zero width"),
        ({"foreground": [[1, 1, 25]]}, 3, "outside the image"),
        ({"foreground": [[1, 1]]}, 3, "3 numbers"),
        ({"foreground": [[1, 1, float("inf")]]}, 3, "finite"),
        ({"foreground": [[1, 1, True]]}, 3, "number"),
        ({"foreground": "1,1,1"}, 3, "list"),
        ({"label": "liver", "foreground": [[1, 1, 1]]}, 3, "Unknown label"),
        ({"foreground": [[1, 1, 1]], "axis": "oblique"}, 3, "axis"),
        ({"foreground": [[1, 1, 1], [2, 2, 3]]}, 2, "slice"),
        ({"prompts": [{"slice": 1}]}, 2, "no box, clicks, scribbles or lasso"),
        ({"prompts": [{"box": [1, 1, 5, 5]}]}, 2, "no 'slice'"),
        ({"prompts": [{"slice": 1, "box": [1, 1, 5, 5]}, {"slice": 2, "box": [1, 1, 5, 5]}]}, 2, "one slice"),
        ({"prompts": "box"}, 3, "list"),
        ({"prompts": [{"slice": 1e300, "box": [1, 1, 5, 5]}]}, 3, "out of range"),
        ({"background": [[1, 1, 3]]}, 3, "only background"),
    ],
)
def test_invalid_requests_raise_prompt_errors_with_clear_messages(req, dim, words):
    with pytest.raises(PromptError) as err:
        parse_request(req, SHAPE, LABELS, dim)
    assert words.lower() in str(err.value).lower()
    assert 400 <= err.value.status < 500
