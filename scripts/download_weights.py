"""Download a checkpoint into the app's model folder and check its SHA-256, as the server does at its first start:
on a machine that can reach the Hugging Face Hub (or a mirror: HF_ENDPOINT), before copying the folder to an
offline server (HF_HUB_OFFLINE=1 there). An interrupted download resumes where it stopped.

    python scripts/download_weights.py MedSAM2_latest
    HF_ENDPOINT=https://hf-mirror.example python scripts/download_weights.py MedSAM2_latest --model-dir /srv/model
    python scripts/download_weights.py https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_2411.pt --sha256 H

A wrong hash, a truncated file or an unreachable hub: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "medsam2"))

from lib.engine.checkpoints import (  # noqa: E402
    APP_MODEL_DIR,
    CheckpointError,
    ensure_checkpoint_file,
    resolve_checkpoint,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint name (see docs/configuration.md), a URL or a file")
    parser.add_argument("--model-dir", type=Path, default=APP_MODEL_DIR, help="default: apps/medsam2/model")
    parser.add_argument("--sha256", default="", help="the hash the file must have (default: the pinned one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        resolved = resolve_checkpoint(args.checkpoint, model_dir=args.model_dir)
        ensure_checkpoint_file(resolved, expected_sha256=args.sha256.strip().lower())
    except CheckpointError as e:
        print(f"download_weights: {e}", file=sys.stderr)
        return 2
    print(f"{resolved.path}: ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
