"""The interactive protocol of the CVPR 2025 challenge on foundation models for interactive 3D biomedical image
segmentation, run through the real server over REST, for any checkpoint and any folder of labelled studies.

Per case: one box per object (a 2D box on the middle slice of the object's extent, the extent sent as
``slice_range``: the challenge's 3D box), then five click steps, each click at the centre of the largest remaining
error region of each object (foreground where the answer missed, background where it overshot); Dice and NSD (2 mm)
after each of the six answers, Dice AUC and NSD AUC over the five click steps (0 to 4, as the challenge computes
them), final Dice and NSD, seconds per interaction (client-side, from the request to the answer). The protocol
itself is lib/training/interactive_protocol.py (the fast test runs the same code in-process).

Studies: MONAI Label's local layout, ``<folder>/<id>.nii.gz`` (or .nrrd) with the truth in
``<folder>/labels/final/<id>.nii.gz``; each label value is an object (``--labels`` names them as the server should;
default ``object_<value>``). Without ``--studies`` the bench writes held-out generated volumes
(lib/training/synthetic.py, never seen in the reference model's training) and serves the reference model.

``--clicks-as`` picks how a click step reaches the app (a comma list runs each on the same server):
``correction`` (``correction: true``: the clicks join the objects' key slices and each object is propagated again
from all of them) or ``refine`` (``refine_from: last``: the last answer is refined on the clicked slices only).

    python bench/interactive_protocol.py --generated 20 --out bench/results/interactive_protocol_cpu.jsonl
    python bench/interactive_protocol.py --studies demo/studies --cases lung2 --window lung \\
        --labels '{"lesion":1}' --out bench/results/interactive_protocol_cpu.jsonl      # the demo CT, its manual label
    python bench/interactive_protocol.py --studies /data/my_studies --checkpoint MedSAM2_latest \\
        --window abdomen --labels '{"liver":1,"tumour":2}'                                 # real weights
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))
sys.path.insert(0, str(REPO / "tests"))

from conftest import start_server, stop_server  # noqa: E402
from lib.training.interactive_protocol import CLICKS_AS, run_case, summarise  # noqa: E402
from lib.training.synthetic import held_out_studies  # noqa: E402
from sam2_testing import REFERENCE_CHECKPOINT, REFERENCE_CONFIG  # noqa: E402

# published figures on this protocol (CVPR 2025 challenge, final test set; not this data)
PUBLISHED = {
    "ENSAM (winner)": {"final_dice": 0.627, "dice_auc": 2.404},
    "nnInteractive, initialised": {"final_dice": 0.6385},
}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")


def write_generated(count: int, folder: Path) -> None:
    """``count`` held-out generated volumes and their labels in MONAI Label's local layout."""
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for study in held_out_studies(count):
        for array, path in ((study.frames, folder), (study.label, folder / "labels" / "final")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(tuple(float(s) for s in reversed(study.spacing_kji)))
            sitk.WriteImage(image, str(path / f"{study.name}.nii.gz"))


def case_ids(folder: Path, only: list[str]) -> list[str]:
    """The ids of the studies that have a final label (``only``: those named)."""
    labels = folder / "labels" / "final"
    ids = sorted(
        p.name[: -len(s)] for p in labels.iterdir() for s in IMAGE_SUFFIXES if p.name.endswith(s) and p.is_file()
    )
    return [i for i in ids if not only or i in only]


def read_label(folder: Path, case: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """The truth (k, j, i) and its spacing (k, j, i) in mm."""
    path = next(p for s in IMAGE_SUFFIXES if (p := folder / "labels" / "final" / f"{case}{s}").exists())
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image).astype(np.uint8), tuple(reversed(image.GetSpacing()))


def rest_ask(server, case: str, client_id: str):
    """``ask`` for the protocol: a ``medsam2_3d`` request to the server, the label map it answers."""

    def ask(params: dict) -> np.ndarray:
        body = {**params, "client_id": client_id, "result_extension": ".nii.gz"}
        r = server.post(f"/infer/medsam2_3d?image={case}&output=image", data={"params": json.dumps(body)}, timeout=900)
        if r.status_code != 200:
            raise RuntimeError(f"{case}: HTTP {r.status_code} {r.text[:500]}")
        with tempfile.NamedTemporaryFile(suffix=".nii.gz") as f:
            f.write(r.content)
            f.flush()
            return sitk.GetArrayFromImage(sitk.ReadImage(f.name)).astype(np.uint8)

    return ask


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=Path, default=None, help="a labelled studies folder (default: generated)")
    ap.add_argument("--generated", type=int, default=10, help="without --studies: how many generated volumes")
    ap.add_argument("--cases", default="", help="comma list of study ids (default: every labelled one)")
    ap.add_argument("--checkpoint", default=str(REFERENCE_CHECKPOINT), help="--conf checkpoint: a name or a file")
    ap.add_argument("--model-config", default="", help="--conf model_config (default: the checkpoint's own)")
    ap.add_argument("--window", default="", help="--conf window (default: 127.5,255 for generated volumes, auto)")
    ap.add_argument("--labels", default="", help='--conf labels, e.g. {"lesion":1} (default: object_<value>)')
    ap.add_argument("--clicks-as", default="correction", help=f"comma list of {sorted(CLICKS_AS)}")
    ap.add_argument("--conf", nargs=2, action="append", default=[], help="more server settings, as --conf KEY VALUE")
    ap.add_argument("--out", default="")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.studies
        if folder is None:
            folder = Path(tmp) / "studies"
            write_generated(args.generated, folder)
        cases = case_ids(folder, [c for c in args.cases.split(",") if c])
        truths = {c: read_label(folder, c) for c in cases}
        values = sorted({int(v) for truth, _ in truths.values() for v in np.unique(truth) if v})
        labels = json.loads(args.labels) if args.labels else {f"object_{v}": v for v in values}
        names = {int(v): k for k, v in labels.items()}
        window = args.window or ("127.5,255" if args.studies is None else "auto")
        config = args.model_config or (str(REFERENCE_CONFIG) if args.checkpoint == str(REFERENCE_CHECKPOINT) else "")
        conf = {"checkpoint": args.checkpoint, "window": window} | ({"model_config": config} if config else {})
        conf |= {"labels": json.dumps(labels, separators=(",", ":")), **dict(args.conf)}
        base = {
            "checkpoint": Path(args.checkpoint).name,
            "studies": str(args.studies) if args.studies else f"{args.generated} held-out generated volumes",
            "window": window,
            "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": torch.get_num_threads(),
        }
        server = start_server(folder, conf, Path(tmp) / "server.log", timeout=600)
        try:
            for variant in args.clicks_as.split(","):
                run_variant(server, variant, cases, truths, names, base, args.out)
        finally:
            stop_server(server)


def run_variant(server, variant: str, cases, truths, names, base: dict, out: str) -> None:
    """Every case with the click steps sent as ``variant``; one line per case, then the summary."""
    results = []
    for case in cases:
        truth, spacing = truths[case]
        ask = rest_ask(server, case, f"protocol-{variant}-{case}")
        results.append(run_case(ask, truth, spacing, names, case, clicks_as=variant))
        emit({**base, "clicks_as": variant, **results[-1].summary()}, out)
    emit({**base, "clicks_as": variant, "summary": True, **summarise(results), "published": PUBLISHED}, out)


def emit(line: dict, out: str) -> None:
    text = json.dumps({**line, "load_average": [round(x, 2) for x in os.getloadavg()]})
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
