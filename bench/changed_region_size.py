"""Bytes on the wire per answer: the whole label as the OHIF panel asked for it before (an uncompressed NRRD of
the volume, ``result_compress: false``) against the changed-region answer (docs/api.md: the box that changed
since the client's last answer, gzip NRRD), on the real server and the demo lung CT (pyradiomics lung2,
512 x 512 x 61), the MedSAM2 model shape with random weights, the app's default settings.

Two clients run the same session on one server: ``whole`` without ``changed_since``, ``box`` with it. After each
answer the box client writes the box into the label it holds, which must equal the whole client's label voxel for
voxel (``exact``). Interactions, in order: the tumour box in 3D bounded by a slice range (the tumour's slices, as
the panel's key slice +-N; the first answer, since "empty"), a 2D box on another slice, a 3D correction click,
undo, redo, and the tumour box again through the whole volume (``reset_state``, as the panel sends it without a
range). Random weights make masks far larger than the tumour (most of each slice), so the boxes are large here;
a 2D answer's whole label holds its slice alone, so the box after a 3D answer spans what the 3D answer held.

    python bench/changed_region_size.py --out bench/results/changed_region_size_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import nrrd
import numpy as np
import requests
import SimpleITK as sitk
import torch
from common import REPO, use_repo_paths
from requests_toolbelt import MultipartDecoder

use_repo_paths()

from conftest import start_server, stop_server  # noqa: E402
from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, save_checkpoint  # noqa: E402
from sam2_testing import object_present_bias  # noqa: E402

PANEL = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}
TUMOUR_BOX = [317, 335, 385, 395]  # pixel x = i, y = j on slice 20 (as bench/interactive_latency.py)
INTERACTIONS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "3d_tumour_slice_range",
        "medsam2_3d",
        {"prompts": [{"label": "lesion", "slice": 20, "box": TUMOUR_BOX}], "slice_range": [15, 25]},
    ),
    ("2d_box", "medsam2_2d", {"prompts": [{"label": "organ", "slice": 40, "box": [60, 120, 250, 400]}]}),
    (
        "3d_correction",
        "medsam2_3d",
        {"prompts": [{"label": "lesion", "slice": 24, "foreground": [[350, 365]]}], "correction": True},
    ),
    ("undo", "medsam2_3d", {"undo": True}),
    ("redo", "medsam2_3d", {"redo": True}),
    (
        "3d_tumour_whole_volume",
        "medsam2_3d",
        {"prompts": [{"label": "lesion", "slice": 20, "box": TUMOUR_BOX}], "reset_state": True},
    ),
]


def split(response: requests.Response) -> tuple[bytes, dict[str, Any]]:
    """(label file, answer JSON) of an ``output=all`` answer, as docs/api.md reads it."""
    parts = MultipartDecoder.from_response(response).parts
    answer = json.loads(next(p.text for p in parts if p.headers[b"Content-Type"] == b"application/json"))
    return next(p.content for p in parts if p.headers[b"Content-Type"] != b"application/json"), answer


def read_nrrd(body: bytes) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".nrrd") as f:
        f.write(body)
        f.flush()
        return nrrd.read(f.name, index_order="C")[0]  # (k, j, i)


def ask(server, model: str, params: dict[str, Any]) -> tuple[requests.Response, float]:
    t0 = time.perf_counter()
    r = server.post(f"/infer/{model}?image=lung2&output=all", data={"params": json.dumps(params)}, timeout=900)
    if r.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {r.status_code} {r.text[:500]}")
    return r, time.perf_counter() - t0


def run(server, shape_kji: tuple[int, ...]) -> list[dict[str, Any]]:
    held, since, lines = np.zeros(shape_kji, np.uint8), "empty", []
    for name, model, params in INTERACTIONS:
        whole_r, whole_s = ask(server, model, {**params, **PANEL, "client_id": "whole"})
        box_r, box_s = ask(server, model, {**params, **PANEL, "client_id": "box", "changed_since": since})
        whole_body, _ = split(whole_r)
        box_body, answer = split(box_r)
        region = answer["changed_region"]
        (i0, j0, k0), box = region["offset_ijk"], read_nrrd(box_body)
        held[k0 : k0 + box.shape[0], j0 : j0 + box.shape[1], i0 : i0 + box.shape[2]] = box
        since = answer["answer_id"]
        lines.append(
            {
                "interaction": name,
                "whole_label_bytes": len(whole_r.content),
                "changed_region_bytes": len(box_r.content),
                "ratio": round(len(whole_r.content) / len(box_r.content), 1),
                "box_size_ijk": region["size_ijk"],
                "changed_voxels": region["changed_voxels"],
                "exact": bool(np.array_equal(held, read_nrrd(whole_body))),
                "whole_s": round(whole_s, 3),
                "changed_region_s": round(box_s, 3),
            }
        )
        print(json.dumps(lines[-1]), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=REPO / "demo" / "studies" / "lung2.nii.gz")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    common = {
        "bench": "changed_region_size",
        "device": "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
        "cpu": platform.processor() or platform.machine(),
        "loadavg_1m": os.getloadavg()[0],
        "image": args.image.name,
        "weights": "random (MedSAM2 shape)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "studies").mkdir()
        os.symlink(args.image.resolve(), folder / "studies" / "lung2.nii.gz")
        torch.manual_seed(0)
        checkpoint = folder / "random_medsam2.pt"
        save_checkpoint(object_present_bias(build_model(MEDSAM2_CONFIG)), checkpoint)
        conf = {"checkpoint": str(checkpoint), "window": "lung"}
        server = start_server(folder / "studies", conf, folder / "server.log", timeout=600)
        try:
            shape = tuple(sitk.ReadImage(str(args.image)).GetSize())[::-1]
            lines = [{**common, **line} for line in run(server, shape)]
        finally:
            stop_server(server)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
