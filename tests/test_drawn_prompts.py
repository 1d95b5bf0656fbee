"""Scribbles, lassos, refining an existing label, and undo/redo, on the engine (no server)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from lib.engine.mask_prompts import (
    Strokes,
    check_lasso,
    lasso_mask,
    parse_strokes,
    resolve_drawn,
    sample_clicks,
    stroke_mask,
)
from lib.engine.preprocessing import parse_window
from lib.engine.prompts import KeySlicePrompt, LabelMap, parse_request
from lib.engine.refine import BaseLabel, LabelFile, compose_with_base, decode_label, refine_range
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings
from lib.engine.session_history import Snapshot, UndoHistory
from lib.engine.volume_session import SessionCache
from lib.errors import PromptError, Unprocessable
from sam2_testing import FixedModelProvider, blob_volume, small_model

LABELS = LabelMap({"lesion": 1, "organ": 2})
SHAPE = (14, 40, 48)  # (k, j, i)
SQUARE = [[12, 10], [34, 10], [34, 28], [12, 28]]


@pytest.fixture(scope="module")
def model():
    return small_model(seed=4)


@pytest.fixture()
def volume_path(tmp_path):
    path = tmp_path / "vol.nii.gz"
    image = sitk.GetImageFromArray(blob_volume(SHAPE, radius=8.0, seed=5))
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(path))
    return path


def _segmenter(model, **kw) -> MedSAM2Segmenter:
    settings = SegmenterSettings(window=parse_window("abdomen"), labels=LABELS, **kw)
    return MedSAM2Segmenter(FixedModelProvider(model), settings, SessionCache(max_sessions=4, max_bytes=1 << 30))


def _label_file(tmp_path, volume_path, array: np.ndarray, name: str = "base.nii.gz") -> str:
    ref = sitk.ReadImage(str(volume_path))
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(ref)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return str(path)


# --- geometry of drawn prompts ------------------------------------------------------------------------------


def test_a_lasso_fills_its_outline_and_a_scribble_is_its_stroke():
    square = lasso_mask((np.array(SQUARE, float),), 40, 48)
    assert square[10:29, 12:35].all() and square.sum() == 19 * 23  # boundary included, nothing outside
    line = stroke_mask((np.array([[5, 5], [15, 5]], float),), 40, 48)
    assert line.sum() == 11 and line[5, 5:16].all()


def test_sampled_clicks_lie_on_the_stroke_spread_along_it():
    line = stroke_mask((np.array([[2, 20], [45, 20]], float),), 40, 48)
    clicks = sample_clicks(line, 4)
    assert len(clicks) == 4 and all(line[int(y), int(x)] for x, y in clicks)
    xs = sorted(x for x, _ in clicks)
    assert xs[0] <= 3 and xs[-1] >= 44  # the ends of the stroke are reached
    assert sample_clicks(line, 4) == clicks  # deterministic


@pytest.mark.parametrize(
    "outline, message",
    [
        ([[1, 1], [5, 5]], "at least 3 points"),
        ([[1, 1], [5, 5], [9, 9]], "no area"),
        ([[0, 0], [10, 10], [10, 0], [0, 10]], "crosses itself"),
    ],
)
def test_degenerate_or_self_crossing_lassos_are_refused(outline, message):
    with pytest.raises(PromptError, match=message):
        check_lasso(np.array(outline, float), "lasso")


def test_strokes_outside_the_slice_or_malformed_are_refused():
    for bad, message in (
        ([[[0, 0], [60, 5]]], "outside the image slice"),
        ([[["a", 1]]], "number pairs"),
        ([[]], "non-empty"),
        ("x", "list of strokes"),
    ):
        with pytest.raises(PromptError, match=message):
            parse_strokes(bad, 40, 48, "s", closed=False)


def test_native_prompts_take_scribbles_and_lassos():
    req = {
        "prompts": [
            {"label": "lesion", "slice": 4, "foreground_scribbles": [[[15, 15], [25, 18]]]},
            {"label": "organ", "slice": 4, "foreground_lasso": [SQUARE], "background_scribbles": [[[1, 1]]]},
        ]
    }
    parsed = parse_request(req, SHAPE, LABELS, 2)
    assert [p.label for p in parsed.prompts] == ["lesion", "organ"]
    assert parsed.prompts[1].as_json(2)["foreground_lasso"] == [SQUARE]


def test_scribbles_become_clicks_or_a_mask_and_background_only_needs_a_label_to_refine():
    prompt = KeySlicePrompt("lesion", 1, 4, strokes=Strokes(foreground_scribbles=(np.array([[15.0, 15], [25, 18]]),)))
    as_points = resolve_drawn(prompt, None, "points", 40, 48)
    assert as_points.points and set(as_points.point_labels) == {1} and as_points.mask is None
    as_mask = resolve_drawn(prompt, None, "mask", 40, 48)
    assert not as_mask.points and as_mask.mask_is_prior and as_mask.mask.sum() > 11
    background = KeySlicePrompt("lesion", 1, 4, strokes=Strokes(background_scribbles=(np.array([[5.0, 5]]),)))
    with pytest.raises(PromptError, match="only background prompts"):
        resolve_drawn(background, None, "points", 40, 48)
    base = np.zeros((40, 48), bool)
    base[10:20, 10:20] = True
    refined = resolve_drawn(background, base, "points", 40, 48, refining=True)
    assert refined.mask_is_prior and refined.point_labels == (0,)
    with pytest.raises(PromptError, match="scribble_mode"):
        resolve_drawn(prompt, None, "brush", 40, 48)


# --- refine: ranges, composition, label files ---------------------------------------------------------------


def test_refine_range_keeps_accepted_slices_unless_a_range_is_asked_for():
    base = BaseLabel(np.zeros((20, 4, 4), np.uint8), "final")
    base.frames[5:10, 1:3, 1:3] = 1
    assert refine_range([7], None, base, 1, 20) == (7, 7)  # only the corrected slice
    assert refine_range([7], (4, 12), base, 1, 20) == (4, 12)
    assert refine_range([7], None, base, 2, 20) == (0, 19)  # a new label: nothing accepted to keep


def test_compose_with_base_changes_only_the_span_of_recomputed_labels():
    base = np.zeros((6, 3, 3), np.uint8)
    base[:, 0, 0] = 1
    base[:, 2, 2] = 2
    computed = np.zeros_like(base)
    computed[:, 1, 1] = 1
    out = compose_with_base(BaseLabel(base, "final"), computed, {1: (2, 3)})
    assert (out[2:4, 1, 1] == 1).all() and (out[2:4, 0, 0] == 0).all()  # label 1 redone inside the span
    assert (out[[0, 1, 4, 5]] == base[[0, 1, 4, 5]]).all()  # outside: the base voxel for voxel
    assert (out[:, 2, 2] == 2).all()  # a label the request does not name is kept everywhere


def test_decode_label_reads_slicer_segments_and_monai_label_scribble_values():
    frames = np.zeros((3, 4, 4), np.int32)
    frames[0, 0, 0], frames[1, 1, 1], frames[2, 2, 2] = 1, 2, 3
    slicer = LabelFile(
        "x",
        "upload",
        [
            {"name": "organ", "id": 1},
            {"name": "background_scribbles", "id": 2},
            {"name": "foreground_scribbles", "id": 3},
        ],
    )
    decoded = decode_label(frames, slicer, LABELS, ("organ", 2))
    assert decoded.base.frames[0, 0, 0] == 2 and decoded.foreground[2, 2, 2] and decoded.background[1, 1, 1]
    conventional = decode_label(frames, LabelFile("x", "upload", scribbles_convention=True), LABELS, ("organ", 2))
    assert conventional.base.frames[0, 0, 0] == 2 and conventional.foreground[2, 2, 2]
    plain = np.zeros((3, 4, 4), np.int32)
    plain[0, 0, 0] = 7
    with pytest.raises(PromptError, match=r"values \[7\]"):
        decode_label(plain, LabelFile("x", "final"), LABELS, ("organ", 2))


# --- the segmenter: refine, 2D strokes, undo/redo -----------------------------------------------------------


def test_refine_from_a_label_file_changes_only_the_corrected_slices(model, tmp_path, volume_path):
    seg = _segmenter(model)
    base = np.zeros(SHAPE, np.uint8)
    base[3:11, 12:28, 14:34] = 1
    base[:, 0:3, 0:3] = 2
    path = _label_file(tmp_path, volume_path, base)
    req = {"prompts": [{"label": "lesion", "slice": 7, "background_lasso": [[[14, 12], [33, 12], [33, 19], [14, 19]]]}]}
    label, out, _ = seg.segment_3d(str(volume_path), req, LabelFile(path, "final"))
    assert out["refined_from"] == "final" and out["changed_slices"] == {"lesion": [7, 7]}
    untouched = [k for k in range(SHAPE[0]) if k != 7]
    assert (label[untouched] == base[untouched]).all()
    assert not (label[7, 12:20, 14:34] == 1).any()  # the background lasso removed what it enclosed
    # with a range, the slices inside it are recomputed and the rest stays
    ranged = {**req, "slice_range": [5, 9], "client_id": "other"}
    label2, out2, _ = seg.segment_3d(str(volume_path), ranged, LabelFile(path, "final"))
    assert out2["changed_slices"] == {"lesion": [5, 9]}
    outside = [k for k in range(SHAPE[0]) if not 5 <= k <= 9]
    assert (label2[outside] == base[outside]).all()
    assert set(np.unique(label2[5:10, 0:3, 0:3])) <= {1, 2}  # the organ is kept where the new lesion is not


def test_a_label_file_on_another_grid_is_refused(model, tmp_path, volume_path):
    seg = _segmenter(model)
    wrong = sitk.GetImageFromArray(np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.uint8))
    path = tmp_path / "wrong.nii.gz"
    sitk.WriteImage(wrong, str(path))
    req = {"prompts": [{"label": "lesion", "slice": 7, "box": [10, 8, 36, 30]}]}
    with pytest.raises(Unprocessable, match="voxels"):
        seg.segment_3d(str(volume_path), req, LabelFile(str(path), "upload"))


def test_2d_lasso_alone_is_the_mask_of_its_slice(model, volume_path):
    seg = _segmenter(model)
    label, out, _ = seg.segment_2d(
        str(volume_path), {"prompts": [{"label": "organ", "slice": 5, "foreground_lasso": [SQUARE]}]}
    )
    expected = lasso_mask((np.array(SQUARE, float),), 40, 48)
    assert ((label[5] == 2) == expected).mean() > 0.97  # SAM2's mask prompt is resized to its input and back
    assert not label[np.arange(SHAPE[0]) != 5].any()


def test_undo_and_redo_restore_answers_without_encoding(model, volume_path):
    seg = _segmenter(model, undo_levels=12)
    req = {"prompts": [{"label": "lesion", "slice": 6, "box": [10, 8, 36, 30]}], "client_id": "u"}
    first, _, _ = seg.segment_3d(str(volume_path), req)
    fix = {
        "prompts": [{"label": "lesion", "slice": 9, "background_lasso": [SQUARE]}],
        "correction": True,
        "client_id": "u",
    }
    second, out, _ = seg.segment_3d(str(volume_path), fix)
    assert out["history"] == {"can_undo": True, "can_redo": False, "undo_levels": 2, "redo_levels": 0}
    undone, info, _ = seg.segment_3d(str(volume_path), {"undo": True, "client_id": "u"})
    assert (undone == first).all() and info["undo"] and info["history"]["can_redo"]
    assert set(info["latencies"]) == {"total"}
    redone, _, _ = seg.segment_3d(str(volume_path), {"redo": True, "client_id": "u"})
    assert (redone == second).all()
    seg.segment_3d(str(volume_path), {"undo": True, "client_id": "u"})
    empty, _, _ = seg.segment_3d(str(volume_path), {"undo": True, "client_id": "u"})
    assert not empty.any()
    with pytest.raises(PromptError, match="Nothing to undo"):
        seg.segment_3d(str(volume_path), {"undo": True, "client_id": "u"})
    with pytest.raises(PromptError, match="Nothing to undo"):  # another user's session has its own history
        seg.segment_3d(str(volume_path), {"undo": True, "client_id": "someone else"})


def test_undo_history_keeps_its_levels_and_drops_redo_after_a_new_edit():
    history = UndoHistory(Snapshot.of({}, None, {}, "start"), levels=10)
    for n in range(15):
        history.push(Snapshot.of({"n": n}, np.full((2, 2), n, np.uint8), {}, "edit"))
    for _ in range(10):
        history.undo()
    assert history.current.state == {"n": 4}
    with pytest.raises(PromptError):
        history.undo()
    history.redo()
    history.push(Snapshot.of({"n": 99}, None, {}, "edit"))
    with pytest.raises(PromptError, match="Nothing to redo"):
        history.redo()


def test_a_refused_3d_request_leaves_the_session_as_it_was(model, volume_path):
    """A background click alone for a label the session does not hold is refused, and its prompt is not kept:
    the session's next request (another label) is answered (it used to fail with the same refusal)."""
    seg = _segmenter(model)
    box = {"client_id": "a", "prompts": [{"label": "lesion", "slice": 7, "box": [10, 8, 36, 30]}]}
    seg.segment_3d(str(volume_path), box)
    refused = {"client_id": "a", "prompts": [{"label": "organ", "slice": 7, "background": [[5, 5]]}]}
    with pytest.raises(PromptError, match="only background"):
        seg.segment_3d(str(volume_path), refused)
    label, _, _ = seg.segment_3d(str(volume_path), {**box, "correction": False})
    assert (label == 1).any() and not (label == 2).any()


def test_background_only_for_a_label_the_refined_base_does_not_hold_is_refused(model, tmp_path, volume_path):
    """The session keeps a refined base; a new request's background click alone for another label has nothing
    to remove from and is refused (it used to pass as 'refining' because the session held some base)."""
    seg = _segmenter(model)
    base = np.zeros(SHAPE, np.uint8)
    base[3:11, 12:28, 14:34] = 1
    path = _label_file(tmp_path, volume_path, base)
    fix = {"client_id": "b", "prompts": [{"label": "lesion", "slice": 7, "background": [[20, 15]]}]}
    seg.segment_3d(str(volume_path), fix, LabelFile(path, "final"))
    organ = {"client_id": "b", "prompts": [{"label": "organ", "slice": 3, "background_scribbles": [[[1, 1]]]}]}
    with pytest.raises(PromptError, match="only background"):
        seg.segment_3d(str(volume_path), organ)
