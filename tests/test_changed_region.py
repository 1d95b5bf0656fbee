"""Changed-region answers (docs/api.md) on the engine: the box, its NRRD file and its geometry, answer ids, and a
client that applies every changed region ending with the whole label, voxel for voxel, through 3D, 2D, a correction,
undo and redo."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from lib.engine.changed_region import ChangedRegion, apply_region, changed_region
from lib.engine.preprocessing import parse_window
from lib.engine.prompts import LabelMap
from lib.engine.segmenter import MedSAM2Segmenter, SegmenterSettings
from lib.engine.volume_session import SessionCache
from lib.errors import StateNotHeld
from lib.imaging.label_region import write_label_region
from sam2_testing import FixedModelProvider, blob_volume, small_model

SHAPE = (12, 40, 48)  # (k, j, i)


def test_the_box_is_the_smallest_holding_every_change_and_nothing_changed_is_one_voxel():
    old = np.zeros((6, 7, 8), np.uint8)
    new = old.copy()
    new[2, 3, 1] = 1
    new[4, 5, 6] = 2
    region = changed_region(new, old, "a.1")
    assert region.offset_kji == (2, 3, 1) and region.size_kji == (3, 3, 6) and region.changed_voxels == 2
    assert region.as_json() == {"since": "a.1", "offset_ijk": [1, 3, 2], "size_ijk": [6, 3, 3], "changed_voxels": 2}
    assert ChangedRegion.from_json(region.as_json()) == region
    same = changed_region(new, new.copy(), "a.2")
    assert same.as_json() == {"since": "a.2", "offset_ijk": [0, 0, 0], "size_ijk": [1, 1, 1], "changed_voxels": 0}


def test_applying_a_changed_region_reproduces_the_new_label():
    rng = np.random.default_rng(3)
    for _ in range(20):
        old = (rng.random((5, 9, 11)) < 0.2).astype(np.uint8) * rng.integers(1, 4)
        new = old.copy()
        k, j, i = rng.integers(0, 5), rng.integers(0, 9), rng.integers(0, 11)
        new[k : k + 2, j : j + 3, i : i + 4] = rng.integers(0, 4)
        region = changed_region(new, old, "x")
        held = old.copy()
        apply_region(held, region, region.crop(new))
        assert np.array_equal(held, new)


@pytest.mark.parametrize(
    "direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 0, 1, 1, 0, 0, 0, 1, 0)]
)
def test_the_region_file_places_the_box_where_the_whole_label_has_those_voxels(tmp_path, direction):
    reference = sitk.Image([48, 40, 12], sitk.sitkUInt8)
    reference.SetSpacing((0.7, 0.8, 2.5))
    reference.SetOrigin((-30.0, 12.5, 100.0))
    reference.SetDirection([float(v) for v in direction])
    label = np.zeros(SHAPE, np.uint8)
    label[3:7, 10:20, 30:45] = 2
    label[5, 12, 31] = 3
    region = changed_region(label, np.zeros_like(label), "empty")
    path = tmp_path / "box.nrrd"
    write_label_region(region.crop(label), reference, region.as_json()["offset_ijk"], path)
    data, header = nrrd.read(str(path), index_order="C")  # (k, j, i), as the app holds volumes
    assert header["type"] == "uint8" and header["encoding"] == "gzip" and header["dimension"] == 3
    assert list(header["sizes"]) == [15, 10, 4]  # i j k
    assert header["medsam2_offset_ijk"] == "30 10 3" and header["medsam2_full_size_ijk"] == "48 40 12"
    assert np.array_equal(data, label[3:7, 10:20, 30:45])
    # every corner of the box lies in patient space where the whole label's voxel of the same index lies
    origin, steps = header["space origin"], header["space directions"]
    for corner in [(0, 0, 0), (14, 0, 0), (0, 9, 3), (14, 9, 3)]:
        in_box = origin + np.asarray(corner, float) @ steps
        whole = reference.TransformIndexToPhysicalPoint([30 + corner[0], 10 + corner[1], 3 + corner[2]])
        assert np.allclose(in_box, whole, atol=1e-9)
    # ITK reads it with the same geometry and pastes it back exactly
    box = sitk.ReadImage(str(path))
    assert reference.TransformPhysicalPointToIndex(box.GetOrigin()) == (30, 10, 3)
    assert np.allclose(box.GetDirection(), reference.GetDirection())


# --- through the segmenter ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter():
    settings = SegmenterSettings(window=parse_window("abdomen"), labels=LabelMap({"lesion": 1, "organ": 2}))
    return MedSAM2Segmenter(FixedModelProvider(small_model(seed=4)), settings, SessionCache(4, 1 << 30))


@pytest.fixture()
def volume_path(tmp_path):
    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(blob_volume(SHAPE, radius=8.0, seed=5)), str(path))
    return str(path)


SEQUENCE = [
    ("3d", {"prompts": [{"label": "lesion", "slice": 6, "box": [10, 8, 36, 30]}], "slice_range": [4, 8]}),
    ("2d", {"prompts": [{"label": "organ", "slice": 4, "box": [5, 5, 20, 20]}]}),
    ("3d", {"prompts": [{"label": "organ", "slice": 7, "box": [6, 6, 22, 22]}], "slice_range": [5, 9]}),
    ("3d", {"prompts": [{"label": "organ", "slice": 9, "background": [[12, 12]]}], "correction": True}),
    ("3d", {"undo": True}),
    ("2d", {"undo": True}),
    ("3d", {"redo": True}),
    ("3d", {"prompts": [{"label": "lesion", "slice": 5, "box": [12, 9, 30, 28]}], "slice_range": [4, 6]}),
]


def test_a_client_applying_changed_regions_holds_every_whole_label(segmenter, volume_path):
    held = np.zeros(SHAPE, np.uint8)  # what the client holds: it starts from an all-zero label
    since = "empty"
    ids = []
    for dimension, request in SEQUENCE:
        run = segmenter.segment_2d if dimension == "2d" else segmenter.segment_3d
        whole, whole_out, _ = run(volume_path, {**request, "client_id": "whole"})
        label, out, _ = run(volume_path, {**request, "client_id": "boxes", "changed_since": since})
        assert np.array_equal(label, whole)  # the same answer, however it is sent
        assert "changed_region" not in whole_out and whole_out["answer_id"] != out["answer_id"]
        region = ChangedRegion.from_json(out["changed_region"])
        assert region.since == since and region.changed_voxels == int((whole != held).sum())
        apply_region(held, region, region.crop(label))
        assert np.array_equal(held, whole), (dimension, request)
        since = out["answer_id"]
        ids.append(since)
    # undo, then redo, name the states they restore: the ids of the answers that made them
    assert ids[4] == ids[2] and ids[5] == ids[1] and ids[6] == ids[2]
    assert len(set(ids)) == 5 and all(i.split(".")[0] == ids[0].split(".")[0] for i in ids)


def test_a_state_the_session_does_not_hold_is_a_409_and_changes_nothing(segmenter, volume_path):
    box = {"prompts": [{"label": "lesion", "slice": 6, "box": [10, 8, 36, 30]}], "client_id": "c409"}
    _, first, _ = segmenter.segment_2d(volume_path, box)
    _, other, _ = segmenter.segment_2d(volume_path, {**box, "client_id": "someone else"})
    for unknown in ("nope", other["answer_id"], first["answer_id"].split(".")[0] + ".99"):
        with pytest.raises(StateNotHeld) as err:  # refused before anything is tracked
            segmenter.segment_3d(volume_path, {**box, "correction": True, "changed_since": unknown})
        assert err.value.status == 409 and "without changed_since" in err.value.detail
    with pytest.raises(StateNotHeld):
        segmenter.segment_2d(volume_path, {"undo": True, "client_id": "c409", "changed_since": "nope"})
    # nothing happened: the session's history still ends at the first answer
    _, again, _ = segmenter.segment_2d(volume_path, {**box, "changed_since": first["answer_id"]})
    assert again["history"]["undo_levels"] == 2 and again["changed_region"]["changed_voxels"] == 0
    assert again["changed_region"]["size_ijk"] == [1, 1, 1]


def test_the_start_state_has_an_id_and_undoing_to_it_answers_the_box_to_clear(segmenter, volume_path):
    request = {"prompts": [{"label": "lesion", "slice": 6, "box": [10, 8, 36, 30]}], "client_id": "start"}
    label, first, _ = segmenter.segment_2d(volume_path, request)
    undone, out, _ = segmenter.segment_2d(
        volume_path, {"undo": True, "client_id": "start", "changed_since": first["answer_id"]}
    )
    assert not undone.any() and out["answer_id"].endswith(".0")
    region = ChangedRegion.from_json(out["changed_region"])
    assert region.changed_voxels == int(label.astype(bool).sum()) > 0 and not region.crop(undone).any()
