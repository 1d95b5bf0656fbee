"""Replay of the MONAI Label 3D Slicer plugin (monailabel 0.8.5) against the real server.

The requests go through the plugin's own ``MONAILabelClient`` (``MONAILabelLib/client.py``), so URL, query string,
multipart body and headers are byte for byte the plugin's; the parameters and the RAS -> IJK geometry the plugin
computes with Slicer objects are reproduced in :mod:`slicer_plugin`. The volumes have IJK axes flipped or permuted
relative to RAS, so an ROI box placed in RAS arrives as reversed or swapped IJK pairs. Random weights make the
masks meaningless, so the tests check geometry (which slices, which box, which label values, which file), not
accuracy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import slicer_plugin as plugin

from conftest import start_server, stop_server, write_image
from sam2_testing import blob_volume, small_config_file

SHAPE = (14, 64, 72)  # (k, j, i)
BLOB_CENTER = (6.0, 18.0, 50.0)  # (k, j, i): off-centre, so a flipped axis would land the box elsewhere
BLOB_RADIUS = 7.0
VOLUMES = {
    # ITK (LPS) direction diag(1, 1, -1): in Slicer's RAS all three IJK axes run against R, A and S
    "flipped_ras": {
        "spacing": (0.9, 1.1, 3.0),
        "origin": (40.0, -25.0, 310.0),
        "direction": (1, 0, 0, 0, 1, 0, 0, 0, -1),
    },
    # a sagittal-like acquisition: i runs posterior, j inferior, k right (a permutation with flips)
    "permuted": {"spacing": (0.8, 0.7, 2.0), "origin": (12.0, -30.0, 95.0), "direction": (0, 0, -1, 1, 0, 0, 0, -1, 0)},
}
CLIENT_ID = "user-xyz"  # MONAILabelLogic.setClientId's default


@pytest.fixture(scope="module")
def slicer_studies(tmp_path_factory) -> Path:
    """Volumes whose IJK axes are flipped / permuted relative to RAS, each with a bright blob off-centre."""
    root = tmp_path_factory.mktemp("slicer_studies")
    for name, geometry in VOLUMES.items():
        volume = blob_volume(SHAPE, center=BLOB_CENTER, radius=BLOB_RADIUS)
        write_image(volume, root / f"{name}.nii.gz", **{k: tuple(map(float, v)) for k, v in geometry.items()})
    return root


@pytest.fixture(scope="module")
def slicer_server(slicer_studies, random_checkpoint, tmp_path_factory):
    """The real server on those volumes, with the 128-input model config for CPU speed."""
    folder = tmp_path_factory.mktemp("slicer_server")
    conf = {"checkpoint": str(random_checkpoint), "model_config": str(small_config_file(folder))}
    server = start_server(slicer_studies, conf, folder / "server.log")
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def client_module() -> Any:
    return plugin.plugin_client_module()


@pytest.fixture
def client(slicer_server, client_module, tmp_path) -> Any:
    """The plugin's client, as ``MONAILabelLogic._client`` makes it (server URL, temp folder, client id)."""
    return client_module.MONAILabelClient(slicer_server.url, str(tmp_path), CLIENT_ID)


@pytest.fixture(scope="module")
def info(slicer_server, client_module) -> dict[str, Any]:
    return client_module.MONAILabelClient(slicer_server.url, "/tmp", CLIENT_ID).info()


def image_of(studies: Path, name: str) -> sitk.Image:
    return sitk.ReadImage(str(studies / f"{name}.nii.gz"))


def blob_box_ijk(studies: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The bright blob's IJK bounding box (min, max), found from the voxels (not from the plugin's math)."""
    array = sitk.GetArrayFromImage(image_of(studies, name))
    k, j, i = np.nonzero(array > 150)
    return np.array([i.min(), j.min(), k.min()]), np.array([i.max(), j.max(), k.max()])


def roi_around_blob(image: sitk.Image, lo: np.ndarray, hi: np.ndarray, margin: float = 1.5) -> tuple[list, list]:
    """An RAS-aligned Slicer ROI (center, size in mm) that encloses the IJK box [lo, hi] with ``margin`` voxels,
    as a user draws it around the blob: the RAS bounds of the box's 8 corners."""
    spans = [(lo[a] - margin, hi[a] + margin) for a in range(3)]
    corners = [[x, y, z] for x in spans[0] for y in spans[1] for z in spans[2]]
    ras = np.array([(plugin.ijk_to_ras(image) @ np.array([*c, 1.0]))[:3] for c in corners])
    low, high = ras.min(axis=0), ras.max(axis=0)
    return list((low + high) / 2), list(high - low)


def sorted_roi(roi: list[int]) -> list[tuple[int, int]]:
    return [tuple(sorted(roi[a : a + 2])) for a in (0, 2, 4)]


def read_label(path: str) -> sitk.Image:
    return sitk.ReadImage(path)


def assert_same_geometry(label: sitk.Image, image: sitk.Image) -> None:
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetSpacing(), image.GetSpacing())
    assert np.allclose(label.GetOrigin(), image.GetOrigin())
    assert np.allclose(label.GetDirection(), image.GetDirection())
    assert label.GetPixelID() == sitk.sitkUInt8  # the plugin asks for result_dtype uint8


def voxel_center_s(image: sitk.Image, k: int) -> float:
    """The S coordinate (mm) of slice ``k``'s centre: the Red slice offset while that slice is shown."""
    return float((plugin.ijk_to_ras(image) @ np.array([0.0, 0.0, k, 1.0]))[2])


def test_plugin_math_turns_an_ras_box_into_reversed_ijk_pairs_that_enclose_the_blob(slicer_studies):
    image = image_of(slicer_studies, "flipped_ras")
    lo, hi = blob_box_ijk(slicer_studies, "flipped_ras")
    center, size = roi_around_blob(image, lo, hi)
    roi = plugin.roi_points_ijk(image, center, size)
    # every axis runs against RAS here, so the plugin's (RAS min, RAS max) corners give (high, low) index pairs
    assert roi[0] > roi[1] and roi[2] > roi[3] and roi[4] > roi[5], roi
    for (a, b), low, high in zip(sorted_roi(roi), lo, hi, strict=True):
        assert a <= low and high <= b, (roi, lo, hi)
    # a click on the blob's centre in RAS comes back as the centre's IJK
    k, j, i = BLOB_CENTER
    ras = (plugin.ijk_to_ras(image) @ np.array([i, j, k, 1.0]))[:3]
    assert plugin.control_point_ijk(image, list(ras)) == [round(i), round(j), round(k)]


def test_info_config_is_what_the_plugin_sends_with_every_request(info):
    assert plugin.params_from_config(info, "medsam2_3d") == {
        "reset_state": False,
        "correction": False,
        "stop_rule": False,
    }
    assert plugin.params_from_config(info, "medsam2_2d") == {}
    assert info["models"]["medsam2_2d"]["dimension"] == 2 and info["models"]["medsam2_3d"]["dimension"] == 3
    assert info["models"]["medsam2_3d"]["type"] == "deepgrow"  # so the plugin puts it in its interactive section


@pytest.mark.parametrize("volume", sorted(VOLUMES))
def test_3d_roi_in_ras_propagates_only_through_the_roi_slices(client, info, slicer_studies, volume):
    image = image_of(slicer_studies, volume)
    lo, hi = blob_box_ijk(slicer_studies, volume)
    # the user boxes the blob in-plane but only slices 4..8 of it (plus the margin): propagation must stop there
    roi = plugin.roi_points_ijk(image, *roi_around_blob(image, np.r_[lo[:2], 4], np.r_[hi[:2], 8]))
    params = plugin.deepgrow_params(info, "medsam2_3d", "lesion", [], [], roi=roi)
    assert params["roi"] == roi and "slice" not in params
    label_file, result = client.infer("medsam2_3d", volume, params)

    label = read_label(label_file)
    assert_same_geometry(label, image)
    array = sitk.GetArrayFromImage(label)
    (i0, i1), (j0, j1), (k0, k1) = sorted_roi(roi)
    k_range = [max(k0, 0), min(k1, SHAPE[0] - 1)]
    labelled = np.nonzero(array.any(axis=(1, 2)))[0]
    assert labelled.size and k_range[0] <= labelled.min() and labelled.max() <= k_range[1], (labelled, roi)
    assert set(np.unique(array).tolist()) == {0, 1}
    assert 0 < k_range[0] and k_range[1] < SHAPE[0] - 1  # a real bound, not the whole volume
    assert plugin.import_into_segments(array, ["lesion"], slice_index=None)["lesion"].any()
    assert result["coverage"]["lesion"]["slices_propagated"] == k_range
    prompt = result["prompts"][0]
    assert prompt["box"] == [i0, j0, i1, j1]  # min/max sorted per axis: x = i, y = j
    assert prompt["slice"] == sum(k_range) // 2
    assert i0 <= lo[0] and hi[0] <= i1 and j0 <= lo[1] and hi[1] <= j1  # the box the model saw encloses the blob


def test_3d_clicks_in_ras_become_a_key_slice_and_propagate_through_the_volume(client, info, slicer_studies):
    image = image_of(slicer_studies, "flipped_ras")
    to_ras = plugin.ijk_to_ras(image)
    k, j, i = BLOB_CENTER
    fg_ras = [list((to_ras @ np.array([i + di, j, k, 1.0]))[:3]) for di in (-2, 2)]
    bg_ras = list((to_ras @ np.array([5.0, 60.0, k, 1.0]))[:3])
    foreground = [plugin.control_point_ijk(image, p) for p in fg_ras]
    background = [plugin.control_point_ijk(image, bg_ras)]
    params = plugin.deepgrow_params(info, "medsam2_3d", "lesion", foreground, background, current_point=foreground[-1])
    label_file, result = client.infer("medsam2_3d", "flipped_ras", params)

    assert_same_geometry(read_label(label_file), image)
    prompt = result["prompts"][0]
    assert prompt["slice"] == round(k)
    assert prompt["foreground"] == [[p[0], p[1]] for p in foreground]
    assert prompt["background"] == [[5, 60]]
    assert result["coverage"]["lesion"]["num_slices_propagated"] == SHAPE[0]
    assert result["session"]["reused"] is False or "slices_encoded_total" in result["session"]


def test_2d_click_labels_only_the_clicked_slice(client, info, slicer_studies):
    image = image_of(slicer_studies, "flipped_ras")
    to_ras = plugin.ijk_to_ras(image)
    k, j, i = 5, 20, 48
    earlier = plugin.control_point_ijk(image, list((to_ras @ np.array([40.0, 30.0, 9.0, 1.0]))[:3]))
    click = plugin.control_point_ijk(image, list((to_ras @ np.array([i, j, k, 1.0]))[:3]))
    assert click == [i, j, k]
    params = plugin.deepgrow_params(info, "medsam2_2d", "lesion", [earlier, click], [], current_point=click)
    assert params["slice"] == k and params["foreground"] == [click]  # the plugin drops clicks on other slices
    label_file, result = client.infer("medsam2_2d", "flipped_ras", params)

    label = read_label(label_file)
    assert_same_geometry(label, image)
    array = sitk.GetArrayFromImage(label)
    assert sorted(set(np.nonzero(array)[0].tolist())) == [k]
    assert result["prompts"][0]["slice"] == k and result["prompts"][0]["foreground"] == [[i, j]]


def test_2d_click_on_slice_0_sends_every_click_and_the_server_keeps_slice_0(client, info, slicer_studies):
    # `if is_3d or not sliceIndex` (plugin line 1670): slice 0 is falsy, so clicks on other slices go along too
    image = image_of(slicer_studies, "flipped_ras")
    params = plugin.deepgrow_params(
        info, "medsam2_2d", "lesion", [[40, 30, 9], [48, 20, 0]], [], current_point=[48, 20, 0]
    )
    assert params["slice"] == 0 and len(params["foreground"]) == 2
    label_file, result = client.infer("medsam2_2d", "flipped_ras", params)
    array = sitk.GetArrayFromImage(read_label(label_file))
    assert_same_geometry(read_label(label_file), image)
    assert sorted(set(np.nonzero(array)[0].tolist())) == [0]
    assert result["prompts"][0]["foreground"] == [[48, 20]]


def test_2d_roi_uses_the_roi_slice_when_the_plugin_sends_the_red_slice_offset_in_mm(client, info, slicer_studies):
    """With an ROI and no click, the plugin sends ``slice = round(abs(Red slice offset))``: millimetres, not an
    index (plugin line 1638). Here the blob's slice 6 is shown at S = 292 mm, so the plugin sends slice 292."""
    image = image_of(slicer_studies, "flipped_ras")
    lo, hi = blob_box_ijk(slicer_studies, "flipped_ras")
    center, size = roi_around_blob(image, lo, hi)
    shown = round(BLOB_CENTER[0])
    size[2] = abs(plugin.ijk_to_ras(image)[2, 2])  # an ROI one slice thick, on the slice being shown
    center[2] = voxel_center_s(image, shown)
    roi = plugin.roi_points_ijk(image, center, size)
    params = plugin.deepgrow_params(info, "medsam2_2d", "lesion", [], [], roi=roi, red_slice_offset=center[2])
    assert params["slice"] == round(abs(center[2])) == 292
    label_file, result = client.infer("medsam2_2d", "flipped_ras", params)

    label = read_label(label_file)
    assert_same_geometry(label, image)
    assert sorted(set(np.nonzero(sitk.GetArrayFromImage(label))[0].tolist())) == [shown]
    (i0, i1), (j0, j1), _ = sorted_roi(roi)
    assert result["prompts"][0]["box"] == [i0, j0, i1, j1]


def test_3d_label_other_than_the_first_lands_in_its_slicer_segment(client, info, slicer_studies):
    """The plugin imports a 3D answer with ``ImportLabelmapToSegmentationNode(labelmap, segmentation, [label])``:
    Slicer gives the segment ``[label]`` the voxels of value 1. Switching the combo box to "organ" (value 2) adds
    ``reset_state: true`` once (plugin lines 729 and 1694-1697)."""
    k, j, i = (round(v) for v in BLOB_CENTER)
    first = plugin.deepgrow_params(info, "medsam2_3d", "lesion", [[i, j, k]], [], current_point=[i, j, k])
    client.infer("medsam2_3d", "permuted", first)
    second = plugin.deepgrow_params(
        info, "medsam2_3d", "organ", [[i, j, k]], [], current_point=[i, j, k], reset_label_state=True
    )
    assert second["reset_state"] is True
    label_file, result = client.infer("medsam2_3d", "permuted", second)
    assert [p["label"] for p in result["prompts_in_session"]] == ["organ"]  # the reset dropped "lesion"

    array = sitk.GetArrayFromImage(read_label(label_file))
    segments = plugin.import_into_segments(array, ["organ"], slice_index=None)
    assert segments[
        "organ"
    ].any(), f"label values in the answer: {np.unique(array).tolist()}; the plugin's 'organ' segment gets value 1 only"


def test_save_label_as_the_plugin_does_and_the_datastore_lists_it_as_final(client, info, slicer_studies, tmp_path):
    image = image_of(slicer_studies, "flipped_ras")
    lo, hi = blob_box_ijk(slicer_studies, "flipped_ras")
    roi = plugin.roi_points_ijk(image, *roi_around_blob(image, lo, hi))
    label_file, _ = client.infer(
        "medsam2_3d", "flipped_ras", plugin.deepgrow_params(info, "medsam2_3d", "lesion", [], [], roi=roi)
    )
    # onSaveLabel: the segments exported to a labelmap on the volume's geometry, saved as <tmp>.nii.gz,
    # label_info = [{"name", "idx"}] over the segment list (one segment per /info/ label, in order)
    exported = sitk.GetArrayFromImage(read_label(label_file)).astype(np.uint8)
    exported[0, :3, :3] = 2  # a second segment, so the file is the user's edit and not the server's answer
    saved = sitk.GetImageFromArray(exported)
    saved.CopyInformation(image)
    label_in = tmp_path / "tmpexport.nii.gz"
    sitk.WriteImage(saved, str(label_in), useCompression=True)
    label_info = [{"name": name, "idx": n + 1} for n, name in enumerate(info["labels"])]

    # MONAILabelLogic.save_label passes no tag (the server's default is "final")
    answer = client.save_label("flipped_ras", str(label_in), params={"label_info": label_info})
    assert answer.get("image") == "flipped_ras", answer
    listing = client.datastore()
    final = listing["objects"]["flipped_ras"]["labels"]["final"]
    assert final["info"]["label_info"] == label_info and final["info"]["client_id"] == CLIENT_ID
    downloaded = client.download_label("flipped_ras", "final")
    assert hashlib.sha256(Path(downloaded).read_bytes()).digest() == hashlib.sha256(label_in.read_bytes()).digest()

    # the same with the tag named, as client.save_label(tag="final") builds it: the final label is replaced, and the
    # one it replaces is kept as the version final-v1 (docs/api.md, saved labels)
    exported[1, :3, :3] = 3
    again = sitk.GetImageFromArray(exported)
    again.CopyInformation(image)
    label_again = tmp_path / "tmpexport2.nii.gz"
    sitk.WriteImage(again, str(label_again), useCompression=True)
    client.save_label("flipped_ras", str(label_again), tag="final", params={"label_info": label_info})
    assert Path(client.download_label("flipped_ras", "final")).read_bytes() == label_again.read_bytes()
    assert sorted(client.datastore()["objects"]["flipped_ras"]["labels"]) == ["final", "final-v1"]
    assert Path(client.download_label("flipped_ras", "final-v1")).read_bytes() == label_in.read_bytes()


def _red_view_axis(image: sitk.Image) -> int:
    """The IJK axis a paint stroke in Slicer's Red (axial) view keeps constant: the one closest to RAS S."""
    return int(np.argmax(np.abs(plugin.ijk_to_ras(image)[2, :3])))


@pytest.mark.parametrize("volume", sorted(VOLUMES))
@pytest.mark.parametrize("with_roi", [False, True], ids=["no ROI", "scribbles ROI"])
def test_scribbles_painted_in_the_red_view_refine_the_segment(client, info, slicer_studies, tmp_path, volume, with_roi):
    """The Scribbles section (``onUpdateScribbles``, lines 1976-2051): the segment being edited, the background and
    foreground scribbles exported into one labelmap, sent as the label file to the scribbles model; the answer is
    imported into the selected segment (value 1, ``updateSegmentationMask(result, [selected])``)."""
    assert info["models"]["medsam2_scribbles"]["type"] == "scribbles"
    image = image_of(slicer_studies, volume)
    blob = sitk.GetArrayFromImage(image) > 150  # (k, j, i)
    axis = _red_view_axis(image)  # IJK axis index (0 i, 1 j, 2 k)
    lo, hi = blob_box_ijk(slicer_studies, volume)
    plane = int((lo[axis] + hi[axis]) // 2)
    kji_axis = 2 - axis
    fg = np.zeros_like(blob)
    bg = np.zeros_like(blob)
    on_plane = [slice(None)] * 3
    on_plane[kji_axis] = plane
    fg[tuple(on_plane)] = blob[tuple(on_plane)]  # painted over the blob on that plane
    ring = np.zeros_like(blob)
    ring[tuple(on_plane)] = True
    bg[ring & ~blob] = True
    bg &= np.roll(blob, 6, axis=(kji_axis + 1) % 3)  # a stroke beside the blob, not everywhere
    existing = blob.copy()
    segments = {"lesion": existing, "background_scribbles": bg, "foreground_scribbles": fg}
    scribbles_in = str(tmp_path / "tmpscribbles.nii.gz")
    label_info = plugin.export_segments(segments, image, scribbles_in)
    roi = plugin.roi_points_ijk(image, *roi_around_blob(image, lo, hi)) if with_roi else []
    params = plugin.scribbles_params(info, "medsam2_scribbles", label_info, "lesion", roi)
    assert params["scribble_mode"] == "points"  # the config's first choice, as getParamsFromConfig sends it

    label_file, result = client.infer("medsam2_scribbles", volume, params, scribbles_in)
    label = read_label(label_file)
    assert_same_geometry(label, image)
    answer = plugin.import_into_segments(sitk.GetArrayFromImage(label), ["lesion"], slice_index=None)["lesion"]
    expected_axis = {2: "axial", 1: "coronal", 0: "sagittal"}[axis]
    assert result["axis"] == expected_axis and result["label_values"] == {"lesion": 1}
    first, last = (plane, plane) if not with_roi else sorted_roi(roi)[axis]
    assert result["changed_slices"] == {"lesion": [first, last]}
    index = np.arange(blob.shape[kji_axis])
    outside = np.take(answer, index[(index < first) | (index > last)], axis=kji_axis)
    kept = np.take(existing, index[(index < first) | (index > last)], axis=kji_axis)
    assert outside.size and (outside == kept).all()  # accepted slices come back voxel for voxel


def test_refine_from_the_final_label_the_plugin_saved(client, info, slicer_studies, tmp_path):
    """Submit Label (``onSaveLabel``) saves the final label; a later request refines it (``refine_from: final``),
    changing the corrected slice only and answering the rest of the saved label voxel for voxel."""
    image = image_of(slicer_studies, "permuted")
    blob = sitk.GetArrayFromImage(image) > 150
    saved = sitk.GetImageFromArray(blob.astype(np.uint8))
    saved.CopyInformation(image)
    label_in = tmp_path / "tmpfinal.nii.gz"
    sitk.WriteImage(saved, str(label_in), useCompression=True)
    label_info = [{"name": name, "idx": n + 1} for n, name in enumerate(info["labels"])]
    client.save_label("permuted", str(label_in), params={"label_info": label_info})
    k = int(np.nonzero(blob.any(axis=(1, 2)))[0].mean())
    rows, cols = np.nonzero(blob[k])
    box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    params = {"refine_from": "final", "prompts": [{"label": "lesion", "slice": k, "box": box}]}
    label_file, result = client.infer("medsam2_3d", "permuted", params)
    assert result["refined_from"] == "final" and result["changed_slices"] == {"lesion": [k, k]}
    answer = sitk.GetArrayFromImage(read_label(label_file))
    others = np.arange(blob.shape[0]) != k
    assert (answer[others] == blob[others]).all()
    with pytest.raises(Exception) as refused:  # the plugin's client raises MONAILabelClientException on a 4xx
        client.infer("medsam2_3d", "flipped_ras", {**params, "refine_from": "never_saved_tag"})
    assert "never_saved_tag" in str(getattr(refused.value, "msg", refused.value))
