"""Intensity preprocessing as MedSAM2 does it: CT windows or MR percentile clipping to uint8 frames,
then per-slice 3-channel, resize to the model size, ImageNet normalisation. All in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "mediastinum": (50.0, 350.0),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class IntensityWindow:
    """How raw intensities become uint8: a CT window (level/width) or percentile clipping (MR/other)."""

    mode: str  # "ct" or "percentile"
    level: float = 0.0
    width: float = 0.0
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    name: str = ""

    def describe(self) -> dict:
        if self.mode == "ct":
            return {"mode": "ct", "name": self.name, "level": self.level, "width": self.width}
        return {"mode": "percentile", "lower": self.lower_percentile, "upper": self.upper_percentile}


def parse_window(spec: str | None) -> IntensityWindow:
    """Parse a window setting: a preset name, ``"L,W"`` (e.g. ``"40,400"``), ``"mr"``/``"percentile"`` or ``"auto"``.

    ``auto`` is resolved per image by :func:`resolve_window`.
    """
    text = (spec or "auto").strip().lower()
    if text in CT_WINDOWS:
        level, width = CT_WINDOWS[text]
        return IntensityWindow("ct", level, width, name=text)
    if text in ("mr", "mri", "percentile", "other"):
        return IntensityWindow("percentile", name="percentile")
    if text == "auto":
        return IntensityWindow("auto", name="auto")
    parts = text.replace(";", ",").split(",")
    if len(parts) == 2:
        try:
            level, width = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            if np.isfinite(level) and np.isfinite(width) and width > 0:
                return IntensityWindow("ct", level, width, name=f"L{level:g}/W{width:g}")
    raise ValueError(
        f"Unknown intensity window '{spec}': use one of {', '.join(CT_WINDOWS)}, 'mr', 'auto', "
        f"or an explicit 'level,width' such as '40,400'."
    )


def resolve_window(window: IntensityWindow, volume: np.ndarray) -> IntensityWindow:
    """Turn ``auto`` into a concrete window: CT abdomen window if the data look like HU, else percentiles."""
    if window.mode != "auto":
        return window
    if volume.size and float(np.min(volume)) <= -500.0:
        level, width = CT_WINDOWS["abdomen"]
        return IntensityWindow("ct", level, width, name="abdomen")
    return IntensityWindow("percentile", name="percentile")


def ct_window(volume: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip to [level - width/2, level + width/2] and scale to uint8 0..255."""
    lo, hi = level - width / 2.0, level + width / 2.0
    out = (np.clip(volume.astype(np.float32), lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(out).astype(np.uint8)


def percentile_clip(volume: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Clip to the [lower, upper] percentiles of the non-zero voxels and scale to uint8 0..255."""
    data = volume.astype(np.float32)
    nonzero = data[data != 0]
    if nonzero.size == 0:
        return np.zeros(volume.shape, dtype=np.uint8)
    lo, hi = np.percentile(nonzero, [lower, upper])
    if hi <= lo:
        hi = lo + 1.0
    out = (np.clip(data, lo, hi) - lo) * (255.0 / (hi - lo))
    out[data == 0] = 0.0  # background stays black, as in MedSAM2
    return np.rint(out).astype(np.uint8)


def to_uint8(volume: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """Apply a resolved window to a volume (any shape)."""
    window = resolve_window(window, volume)
    if window.mode == "ct":
        return ct_window(volume, window.level, window.width)
    return percentile_clip(volume, window.lower_percentile, window.upper_percentile)


def frames_to_model_input(
    frames: np.ndarray | torch.Tensor, image_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 frames (N, H, W) -> float32 (N, 3, S, S): grey to 3 channels, bilinear resize, ImageNet norm."""
    x = torch.as_tensor(frames).to(device)
    x = x.float().div_(255.0).unsqueeze(1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std
