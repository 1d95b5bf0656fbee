"""The reference model's scores (or any checkpoint's, with its config) on held-out generated volumes, through the
engine's 3D propagation from a key-slice prompt in both directions (lib/training/prompt_following.py): box and
click Dice of the prompted object, the answers' overlap with the objects not prompted, the wrong-box control (a box
on another object must return that object and leave the first alone), and empty slices past the objects' ends.
The checkpoint is loaded the way the app loads it (``--conf checkpoint`` + ``--conf model_config``). One JSON line
per prompt kind, then a summary.

    python bench/reference_model.py --out bench/results/reference_model_cpu.jsonl
    python bench/reference_model.py --checkpoint my.pt --config my.yaml --volumes 50 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from common import REPO, JsonLines, device_name, dtype_name, use_repo_paths

use_repo_paths()


from lib.engine.checkpoints import load_model, resolve_checkpoint  # noqa: E402
from lib.engine.precision import compute_dtype_for  # noqa: E402
from lib.training.prompt_following import score_prompt_following  # noqa: E402
from lib.training.synthetic import HELD_OUT_SEEDS, held_out_studies  # noqa: E402

REFERENCE_CHECKPOINT = REPO / "tests" / "fixtures" / "reference_sam2.pt"
REFERENCE_CONFIG = REPO / "apps" / "medsam2" / "model" / "configs" / "reference_sam2.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=REFERENCE_CHECKPOINT)
    ap.add_argument("--config", type=Path, default=REFERENCE_CONFIG)
    ap.add_argument("--volumes", type=int, default=40, help="held-out generated volumes (lib/training/synthetic.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = compute_dtype_for(device, args.precision)
    model = load_model(resolve_checkpoint(str(args.checkpoint), config=args.config), device)
    studies = held_out_studies(args.volumes)
    t0 = time.time()
    summary = score_prompt_following(model, studies, device, dtype).summary()
    base = {
        "checkpoint": args.checkpoint.name,
        "config": args.config.name,
        "device": device_name(device) if device.type == "cuda" else "cpu",
        "precision": dtype_name(dtype),
        "volumes": f"{args.volumes} held out (seeds {HELD_OUT_SEEDS[0]}..{HELD_OUT_SEEDS[0] + args.volumes - 1})",
    }
    lines = [{"prompt": kind, **scores} for kind, scores in summary.items()]
    lines.append({"summary": True, "seconds": round(time.time() - t0, 1), "load_average": list(os.getloadavg())})
    out = JsonLines(args.out, **base)
    for line in lines:
        out.emit(line)


if __name__ == "__main__":
    main()
