"""What the MONAI Label 3D Slicer plugin (monailabel 0.8.5) computes and sends, without Slicer.

The HTTP layer is the plugin's own ``MONAILabelLib/client.py`` (it needs no Slicer), imported from the plugin folder
that the ``monailabel`` wheel installs into ``.venv/monailabel/plugins/slicer/MONAILabel``. The geometry and the
request parameters that ``MONAILabel.py`` builds with Slicer/VTK objects are reproduced here in numpy; each function
names the plugin lines it follows (line numbers of the 0.8.5 ``MONAILabel.py``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / ".venv" / "monailabel" / "plugins" / "slicer" / "MONAILabel"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def plugin_client_module() -> Any:
    """The plugin's ``MONAILabelLib.client`` module, imported from the installed plugin folder."""
    if not (PLUGIN_DIR / "MONAILabelLib" / "client.py").is_file():
        raise FileNotFoundError(f"the monailabel wheel's Slicer plugin is missing: {PLUGIN_DIR}")
    if str(PLUGIN_DIR) not in sys.path:
        sys.path.insert(0, str(PLUGIN_DIR))
    return importlib.import_module("MONAILabelLib.client")


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJKToRAS matrix Slicer gives a volume loaded from this file (ITK geometry is LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ matrix


def ras_to_ijk(image: sitk.Image) -> np.ndarray:
    """``volumeNode.GetRASToIJKMatrix``: the inverse of :func:`ijk_to_ras`."""
    return np.linalg.inv(ijk_to_ras(image))


def _multiply_point(matrix: np.ndarray, point3: list[float]) -> list[float]:
    """``vtkMatrix4x4.MultiplyDoublePoint`` on ``[x, y, z, 1.0]``."""
    return [float(v) for v in matrix @ np.array([*point3, 1.0])]


def control_point_ijk(image: sitk.Image, ras: list[float]) -> list[int]:
    """``getControlPointXYZ`` / ``getControlPointsXYZ`` (lines 925-963): RAS -> IJK, ``round`` per component."""
    return [round(v) for v in _multiply_point(ras_to_ijk(image), ras)][0:3]


def roi_points_ijk(image: sitk.Image, center_ras: list[float], size_ras: list[float]) -> list[int]:
    """``getROIPointsXYZ`` (lines 2053-2080): the ROI's RAS min and max corners, each mapped to IJK and rounded,
    interleaved as ``[i(min), i(max), j(min), j(max), k(min), k(max)]``; a flipped axis gives a reversed pair."""
    roi_points_ras = [(x - s / 2, x + s / 2) for x, s in zip(center_ras, size_ras, strict=True)]
    roi_points_ras = [item for sublist in roi_points_ras for item in sublist]
    min_points_ras = [roi_points_ras[0], roi_points_ras[2], roi_points_ras[4]]
    max_points_ras = [roi_points_ras[1], roi_points_ras[3], roi_points_ras[5]]
    matrix = ras_to_ijk(image)
    min_points_ijk = [round(v) for v in _multiply_point(matrix, min_points_ras)]
    max_points_ijk = [round(v) for v in _multiply_point(matrix, max_points_ras)]
    return [val for pair in zip(min_points_ijk[0:3], max_points_ijk[0:3], strict=True) for val in pair]


def params_from_config(info: dict[str, Any], model: str) -> dict[str, Any]:
    """``getParamsFromConfig("infer", model)`` (lines 892-900): the model's ``config`` from ``/info/``,
    a list value replaced by its first element."""
    config = info.get("models", {}).get(model, {}).get("config", {})
    return {k: v[0] if isinstance(v, list) else v for k, v in config.items()}


def deepgrow_params(
    info: dict[str, Any],
    model: str,
    label: str,
    foreground_all: list[list[int]],
    background_all: list[list[int]],
    roi: list[int] | None = None,
    current_point: list[int] | None = None,
    red_slice_offset: float = 0.0,
    reset_label_state: bool = False,
) -> dict[str, Any]:
    """The ``params`` that ``onClickDeepgrow`` (lines 1591-1701) and ``MONAILabelLogic.infer`` (lines 2376-2382)
    hand to ``MONAILabelClient.infer`` (which adds ``client_id``).

    ``current_point``: the IJK of the point just placed (a click triggers the request), None for the "update"
    button. ``red_slice_offset``: the Red (axial) slice view's offset in mm, which the plugin uses as the slice
    index for a 2D request with an ROI and no current point (line 1638). ``reset_label_state``: the user switched
    the label in the combo box since the last request (line 729), which adds ``reset_state: true`` once.
    """
    is_3d = info["models"][model].get("dimension", 3) != 2
    selected_roi = list(roi) if roi else []
    if not current_point:
        if not foreground_all and not is_3d and not selected_roi:
            raise ValueError("the plugin refuses: points/roi not added")
        if not is_3d and selected_roi:
            current_point = [
                selected_roi[1] + (selected_roi[1] - selected_roi[0]) // 2,
                selected_roi[3] + (selected_roi[3] - selected_roi[2]) // 2,
                round(abs(red_slice_offset)),
            ]
        else:
            current_point = foreground_all[-1] if foreground_all else background_all[-1] if background_all else None
    slice_index = current_point[2] if current_point else None
    if is_3d or not slice_index:
        foreground, background = foreground_all, background_all
    else:
        foreground = [x for x in foreground_all if x[2] == slice_index]
        background = [x for x in background_all if x[2] == slice_index]
    params: dict[str, Any] = {"label": label, "foreground": foreground, "background": background}
    params["label"] = label
    params.update(params_from_config(info, model))
    if selected_roi:
        params["roi"] = selected_roi
    if not is_3d:
        params["slice"] = slice_index
    if not params.get("reset_state") and reset_label_state:
        params["reset_state"] = True
    params["result_extension"] = ".nrrd"  # MONAILabelLogic.infer
    params["result_dtype"] = "uint8"
    return params


def import_into_segments(label_kji: np.ndarray, labels: list[str], slice_index: int | None) -> dict[str, np.ndarray]:
    """Which voxels each Slicer segment gets from the returned label (``updateSegmentationMask``, lines 1768-1890).

    3D (``slice_index`` None): ``ImportLabelmapToSegmentationNode(labelmap, segmentation, segmentIds)`` with
    ``segmentIds = labels``, where Slicer maps label value ``n + 1`` to ``segmentIds[n]``
    (vtkSlicerSegmentationsModuleLogic.h: "Defines how label values 1..N are mapped to segment IDs (0..N-1)").
    2D: the labelmap is imported as one new segment per label value present (ascending) and the n-th new segment
    is added to ``labels[n]``, on ``slice_index`` only after that slice was cleared.
    """
    if slice_index is None:
        return {name: label_kji == n + 1 for n, name in enumerate(labels)}
    values = [int(v) for v in np.unique(label_kji) if v != 0]
    return {name: label_kji == value for name, value in zip(labels, values, strict=False)}


def export_segments(segments: dict[str, np.ndarray], reference: sitk.Image, path: str) -> list[dict[str, Any]]:
    """``onUpdateScribbles`` (lines 1985-2006): every segment exported into one labelmap on the volume's geometry
    (``ExportSegmentsToLabelmapNode``, segment n -> value n + 1, later segments over earlier ones) and saved to
    ``path``; returns the ``label_info`` it sends: ``[{"name": segment name, "id": n + 1}, ...]``."""
    label = np.zeros(sitk.GetArrayFromImage(reference).shape, dtype=np.uint8)
    for n, mask in enumerate(segments.values()):
        label[mask] = n + 1
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(reference)
    sitk.WriteImage(image, path)
    return [{"name": name, "id": n + 1} for n, name in enumerate(segments)]


def scribbles_params(
    info: dict[str, Any], model: str, label_info: list, selected_label_name: str, roi: list[int] | None = None
) -> dict[str, Any]:
    """The ``params`` of ``onUpdateScribbles`` (lines 2018-2024) plus ``MONAILabelLogic.infer`` (lines 2381-2382):
    the model's config, ``roi`` (the Scribbles ROI in IJK, or []), ``label_info``, ``selected_label_name``."""
    params = params_from_config(info, model)
    params.update({"roi": list(roi) if roi else []})
    params.update({"label_info": label_info})
    params.update({"selected_label_name": selected_label_name})
    params["result_extension"] = ".nrrd"
    params["result_dtype"] = "uint8"
    return params
