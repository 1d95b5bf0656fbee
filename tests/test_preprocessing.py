"""CT windows, MR percentile clipping, model input tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.engine.preprocessing import (
    CT_WINDOWS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ct_window,
    frames_to_model_input,
    parse_window,
    percentile_clip,
    resolve_window,
    to_uint8,
)


def test_ct_window_maps_level_and_width_to_0_255():
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.int16)
    out = ct_window(hu, 40, 400)  # abdomen: [-160, 240]
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("name", sorted(CT_WINDOWS))
def test_presets_parse(name):
    w = parse_window(name)
    assert (w.mode, w.level, w.width) == ("ct", *CT_WINDOWS[name])


def test_explicit_level_width_and_errors():
    w = parse_window("-600,1500")
    assert (w.level, w.width) == (-600, 1500)
    for bad in ("liver", "40,-1", "40,nan", "a,b"):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_percentile_clip_ignores_zero_background():
    rng = np.random.default_rng(0)
    mr = np.zeros((4, 32, 32), dtype=np.float32)
    mr[:, 8:24, 8:24] = rng.uniform(100, 200, (4, 16, 16))
    mr[0, 10, 10] = 1e6  # an outlier above the 99.5th percentile
    out = percentile_clip(mr)
    assert out[mr == 0].max() == 0
    assert out[0, 10, 10] == 255
    inner = out[:, 8:24, 8:24]
    assert inner.min() == 0 and np.percentile(inner, 50) > 100


def test_auto_window_picks_ct_for_hounsfield_units_and_percentile_otherwise():
    assert resolve_window(parse_window("auto"), np.array([-1024.0, 50.0])).name == "abdomen"
    assert resolve_window(parse_window("auto"), np.array([0.0, 900.0])).mode == "percentile"
    assert to_uint8(np.array([[-1024.0, 300.0]]), parse_window("auto")).tolist() == [[0, 255]]


def test_frames_to_model_input_shape_and_normalisation():
    frames = np.full((2, 40, 60), 255, dtype=np.uint8)
    x = frames_to_model_input(frames, 64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=False)]
    assert torch.allclose(x[0, :, 10, 10], torch.tensor(expected), atol=1e-5)
