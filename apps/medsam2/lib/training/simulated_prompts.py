"""The simulated annotator of training: the prompts drawn on the first slice of a clip (a jittered box,
clicks, or the mask itself, as SAM2 trains) and the correction click a user would add."""

from __future__ import annotations

import numpy as np
import torch

from lib.training.settings import TrainSettings


def _box_of(mask: np.ndarray, rng: np.random.Generator, jitter: float = 0.1) -> list[float]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    noise = rng.normal(0, jitter, 4) * np.array([w, h, w, h])
    box = np.array([x0, y0, x1, y1], dtype=np.float64) + noise
    H, W = mask.shape
    return [
        float(np.clip(box[0], 0, W - 1)),
        float(np.clip(box[1], 0, H - 1)),
        float(np.clip(box[2], 0, W - 1)),
        float(np.clip(box[3], 0, H - 1)),
    ]


def _click_in(region: np.ndarray, rng: np.random.Generator) -> tuple[float, float] | None:
    ys, xs = np.nonzero(region)
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    return float(xs[i]), float(ys[i])


def prompt_kind(settings: TrainSettings, rng: np.random.Generator) -> str:
    """What the simulated annotator gives on a step's first slice: ``mask``, ``box`` or ``clicks``."""
    if rng.random() < settings.p_mask:
        return "mask"
    return "box" if rng.random() < settings.p_box else "clicks"


def simulate_prompts(masks0: np.ndarray, rng: np.random.Generator, image_size: int, kind: str):
    """Per object on the first slice: a jittered box, 1-3 clicks, or the mask itself (as SAM2 trains), as
    ``(point_inputs, mask_inputs)`` with point coordinates in the model's input scale."""
    b, h, w = masks0.shape
    if kind == "mask":
        return None, torch.from_numpy(masks0[:, None].astype(np.float32))
    use_box = kind == "box"
    coords, labels = [], []
    for obj in range(b):
        pts, lab = [], []
        if use_box:
            x0, y0, x1, y1 = _box_of(masks0[obj], rng)
            pts += [(x0, y0), (x1, y1)]
            lab += [2, 3]
        else:
            for _ in range(int(rng.integers(1, 4))):
                fg = rng.random() < 0.8
                p = _click_in(masks0[obj] if fg else ~masks0[obj], rng)
                if p is not None:
                    pts.append(p)
                    lab.append(1 if fg else 0)
            if 1 not in lab:
                pts.append(_click_in(masks0[obj], rng))  # type: ignore[arg-type]
                lab.append(1)
        coords.append(pts)
        labels.append(lab)
    width = max(len(p) for p in coords)
    pc = torch.zeros(b, width, 2)
    pl = torch.full((b, width), -1, dtype=torch.int32)  # -1: padding, ignored by SAM's prompt encoder
    for obj in range(b):
        pc[obj, : len(coords[obj])] = torch.tensor(coords[obj], dtype=torch.float32)
        pl[obj, : len(labels[obj])] = torch.tensor(labels[obj], dtype=torch.int32)
    pc = pc / torch.tensor([w, h], dtype=torch.float32) * image_size
    return {"point_coords": pc, "point_labels": pl}, None


def add_correction_click(
    point_inputs: dict, pred_high: torch.Tensor, gt: torch.Tensor, rng: np.random.Generator
) -> dict:
    """``point_inputs`` plus, per object, one click in the larger error region of the prediction (a positive
    click in what it missed, or a negative one in what it added); objects without error get a padding point."""
    pred = (pred_high[:, 0] > 0).cpu().numpy()
    target = (gt > 0).cpu().numpy()
    coords, labels = [], []
    for obj in range(pred.shape[0]):
        fn, fp = target[obj] & ~pred[obj], pred[obj] & ~target[obj]
        use_fn = fn.sum() >= fp.sum()
        click = _click_in(fn if use_fn else fp, rng)
        coords.append(click if click is not None else (0.0, 0.0))
        labels.append((1 if use_fn else 0) if click is not None else -1)
    dev = point_inputs["point_coords"].device
    pc = torch.cat([point_inputs["point_coords"], torch.tensor(coords, device=dev)[:, None]], dim=1)
    pl = torch.cat([point_inputs["point_labels"], torch.tensor(labels, dtype=torch.int32, device=dev)[:, None]], dim=1)
    return {"point_coords": pc, "point_labels": pl}
