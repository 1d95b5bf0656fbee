"""Helpers shared by the tests: a small random-weights SAM2 model and synthetic volumes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "medsam2"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from lib.engine.checkpoints import MEDSAM2_CONFIG, build_model, image_size_overrides, load_model, resolve_checkpoint  # noqa: E402,I001

# The reference model (scripts/train_reference_model.py, docs/reference_model.md): the SAM2 architecture at 128 input,
# trained on generated volumes (lib/training/synthetic.py) to follow prompts. Use it where a test's assertion is about
# what the model answers (a box selects its object, a click changes the mask where it lands); random weights where
# only shapes and plumbing are checked.
REFERENCE_CHECKPOINT = APP_DIR.parents[1] / "tests" / "fixtures" / "reference_sam2.pt"
REFERENCE_CONFIG = APP_DIR / "model" / "configs" / "reference_sam2.yaml"

# hiera-t at 256x256 input: the MedSAM2 architecture at a quarter of the pixels, for CPU speed.
SMALL_OVERRIDES = image_size_overrides(256)


def small_config_file(folder: Path, size: int = 128) -> Path:
    """The MedSAM2 config at ``size`` input as a YAML file (what ``--conf model_config`` takes), for CPU speed."""
    grid = size // 16
    text = MEDSAM2_CONFIG.read_text().replace("image_size: 512", f"image_size: {size}")
    path = folder / f"medsam2_{size}.yaml"
    path.write_text(text.replace("[32, 32]", f"[{grid}, {grid}]"))
    return path


def object_present_bias(model: torch.nn.Module, bias: float = 4.0) -> torch.nn.Module:
    """Shift the object-score head so a random model reports "object present" (else every mask is empty)."""
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += bias
    return model


def small_model(seed: int = 0) -> torch.nn.Module:
    """Random-weights SAM2 video model (hiera-t, 256 input) in eval mode on the CPU, objects 'present'."""
    torch.manual_seed(seed)
    return object_present_bias(build_model(MEDSAM2_CONFIG, "cpu", SMALL_OVERRIDES).eval())


def reference_model(device: str = "cpu") -> torch.nn.Module:
    """The reference model in eval mode, loaded as the app loads ``--conf checkpoint`` with ``--conf model_config``."""
    return load_model(resolve_checkpoint(str(REFERENCE_CHECKPOINT), config=REFERENCE_CONFIG), device)


def blob_volume(shape=(24, 64, 80), center=None, radius=10.0, seed: int = 0) -> np.ndarray:
    """A (k, j, i) CT-like volume in HU: a bright ellipsoid in noisy soft tissue."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    c = center or (shape[0] / 2, shape[1] / 2, shape[2] / 2)
    r = ((k - c[0]) / (radius * 0.8)) ** 2 + ((j - c[1]) / radius) ** 2 + ((i - c[2]) / (radius * 1.2)) ** 2
    vol = 40.0 + rng.normal(0, 15, shape).astype(np.float32)
    vol[r <= 1.0] += 200.0
    return vol.astype(np.int16)


class FixedModelProvider:
    """Stands in for lib.engine.model_provider.ModelProvider: always serves ``model`` on the CPU in fp32."""

    checkpoint = type("Checkpoint", (), {"name": "random", "is_random": True})()
    device = torch.device("cpu")
    compute_dtype = None

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def get(self) -> tuple[torch.nn.Module, int]:
        return self.model, 1
