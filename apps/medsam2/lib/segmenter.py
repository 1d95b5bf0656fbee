"""What the 2D and 3D tasks do, without MONAI Label: image -> session -> prompts -> label volume + JSON."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .model_provider import ModelProvider
from .preprocessing import IntensityWindow, resolve_window, to_uint8
from .prompts import AXIS_NAMES, KeySlicePrompt, LabelMap, ParsedRequest, PromptError, parse_axis, parse_request
from .propagation import compose_labels, propagate_volume, segment_key_slice
from .volume_io import LoadedImage, load_image
from .volume_session import SessionCache, VolumeSession, frames_along_axis, frames_to_volume


@dataclass
class SegmenterSettings:
    """Per-app settings, from ``--conf``."""

    window: IntensityWindow
    labels: LabelMap
    max_voxels: int | None = 512 * 512 * 1200
    encode_batch: int = 8
    feature_dtype: torch.dtype = torch.float32


@dataclass
class ImageSession:
    """A cached image: its encoded volume, geometry, window, and the prompts given so far (3D)."""

    volume: VolumeSession
    image: LoadedImage
    window: IntensityWindow
    prompts: dict[tuple[str, int], KeySlicePrompt] = field(default_factory=dict)
    label_ranges: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    @property
    def lock(self):
        return self.volume.lock

    def nbytes(self) -> int:
        return self.volume.nbytes() + int(self.image.array.nbytes)


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on") if value is not None else False


class MedSAM2Segmenter:
    """Serves key-slice (2D) and propagation (3D) requests from cached per-image sessions."""

    def __init__(self, provider: ModelProvider, settings: SegmenterSettings, cache: SessionCache):
        self.provider = provider
        self.settings = settings
        self.cache = cache

    def open_image(
        self, image_path: str, axis: int, model: torch.nn.Module, timings: dict[str, float] | None = None
    ) -> ImageSession:
        """Read an image (size limit applied), window it and wrap it for the model: nothing encoded yet."""
        t1 = time.perf_counter()
        image = load_image(image_path, self.settings.max_voxels)
        t2 = time.perf_counter()
        window = resolve_window(self.settings.window, image.array)
        frames = frames_along_axis(to_uint8(image.array, window), axis)
        volume = VolumeSession(
            frames,
            model,
            self.provider.device,
            self.provider.compute_dtype,
            self.settings.feature_dtype,
            self.settings.encode_batch,
        )
        if timings is not None:
            timings["load"] = round(t2 - t1, 4)
            timings["preprocess"] = round(time.perf_counter() - t2, 4)
        return ImageSession(volume, image, window)

    def _session(
        self, image_path: str, request: dict[str, Any], axis: int
    ) -> tuple[ImageSession, bool, dict[str, float], tuple]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        model, version = self.provider.get()
        timings["model"] = round(time.perf_counter() - t0, 4)
        try:
            st = os.stat(image_path)
            stamp = (st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):
            raise PromptError("The image was not found in the datastore. Check the image id.", status=404) from None
        user = str(request.get("annotation_session") or request.get("client_id") or "default")
        key = (os.path.realpath(image_path), stamp, user, axis, self.settings.window, version)

        session, created = self.cache.get_or_create(key, lambda: self.open_image(image_path, axis, model, timings))
        return session, not created, timings, key

    def _common_json(self, session: ImageSession, parsed: ParsedRequest, reused: bool) -> dict[str, Any]:
        ckpt = self.provider.checkpoint
        image = session.image
        return {
            "prompts": [p.as_json(parsed.axis) for p in parsed.prompts],
            "notes": parsed.notes,
            "label_names": dict(self.settings.labels.by_name),
            "image": {"shape_ijk": list(image.array.shape[::-1]), "spacing": list(image.spacing)},
            "window": session.window.describe(),
            "model": {"checkpoint": ckpt.name, "random_weights": ckpt.is_random, "device": str(self.provider.device)},
            "session": {"reused": reused, "slices_encoded_total": session.volume.slices_encoded},
        }

    def segment_2d(self, image_path: str, request: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any], Any]:
        """One slice from a box/clicks. Returns (label volume (k, j, i) uint8, result JSON, reference image)."""
        t0 = time.perf_counter()
        session, reused, timings, key = self._session(image_path, request, axis=2)
        image = session.image
        parsed = parse_request(request, image.array.shape, self.settings.labels, dimension=2)
        volume = session.volume
        _, rows, cols = volume.frames.shape
        with session.lock:
            t1 = time.perf_counter()
            index = parsed.prompts[0].slice_index
            encoded_before = volume.is_encoded(index)
            volume.encode([index])
            t2 = time.perf_counter()
            logits = [segment_key_slice(volume, p)["pred_masks"] for p in parsed.prompts]
            t3 = time.perf_counter()
        self.cache.update_size(key)
        values = [p.label_value for p in parsed.prompts]
        slice_label = compose_labels(torch.cat(logits, dim=1), values, rows, cols)[0]
        label = np.zeros(image.array.shape, dtype=np.uint8)
        label[index] = slice_label
        result = self._common_json(session, parsed, reused)
        result["slice_encoded_before"] = encoded_before
        result["num_labelled_pixels"] = int((slice_label > 0).sum())
        result["latencies"] = {
            **timings,
            "encode": round(t2 - t1, 4),
            "decode": round(t3 - t2, 4),
            "post": round(time.perf_counter() - t3, 4),
            "total": round(time.perf_counter() - t0, 4),
        }
        return label, result, image.reference

    def segment_3d(self, image_path: str, request: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any], Any]:
        """Key-slice prompts propagated through the volume, all labels of the session at once."""
        t0 = time.perf_counter()
        axis = parse_axis(request.get("axis"))
        session, reused, timings, key = self._session(image_path, request, axis=axis)
        image = session.image
        if session.volume.num_slices < 2:
            raise PromptError("This image has a single slice: use the 2D model (medsam2_2d) for 2D images.")
        parsed = parse_request(request, image.array.shape, self.settings.labels, dimension=3)
        with session.lock:
            if _truthy(request.get("reset_state")):
                session.prompts.clear()
            named = {p.label for p in parsed.prompts}
            session.prompts = {k: v for k, v in session.prompts.items() if k[0] not in named}
            for p in parsed.prompts:
                session.prompts[(p.label, p.slice_index)] = p
            for name in named:
                session.label_ranges[name] = parsed.slice_range
            prompts = list(session.prompts.values())
            result = propagate_volume(session.volume, prompts, _union_range(session.label_ranges))
        self.cache.update_size(key)
        t1 = time.perf_counter()
        frames = result.label_frames()
        label = frames_to_volume(frames, axis)
        t2 = time.perf_counter()
        out = self._common_json(session, parsed, reused)
        out["prompts_in_session"] = [p.as_json(axis) for p in prompts]
        out["axis"] = AXIS_NAMES[axis]
        out["coverage"] = result.coverage()
        out["object_scores"] = {
            k: {str(f): round(v, 3) for f, v in per.items()} for k, per in result.object_scores.items()
        }
        out["latencies"] = {
            **timings,
            **result.latencies,
            "compose": round(t2 - t1, 4),
            "total": round(time.perf_counter() - t0, 4),
        }
        out["slices_per_second"] = round(result.num_slices * len(result.logits) / max(t2 - t0, 1e-9), 2)
        return label, out, image.reference


def _union_range(ranges: dict[str, tuple[int, int] | None]) -> tuple[int, int] | None:
    if not ranges or any(r is None for r in ranges.values()):
        return None
    return (min(r[0] for r in ranges.values() if r), max(r[1] for r in ranges.values() if r))
