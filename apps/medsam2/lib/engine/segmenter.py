"""What the 2D and 3D tasks do, without MONAI Label: image -> session -> prompts -> label volume + JSON."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lib.engine.confidence import check_hint, slice_confidence, slices_to_check
from lib.engine.model_provider import ModelProvider
from lib.engine.preprocessing import IntensityWindow, resolve_window, to_uint8
from lib.engine.prompts import (
    AXIS_NAMES,
    KeySlicePrompt,
    LabelMap,
    ParsedRequest,
    PromptError,
    parse_axis,
    parse_flag,
    parse_request,
    parse_stop_options,
)
from lib.engine.propagation import StopRule, compose_labels, propagate_volume, segment_key_slice
from lib.engine.volume_session import SessionCache, VolumeSession, frames_along_axis, frames_to_volume, tensor_bytes
from lib.imaging.volume_io import LoadedImage, load_image

logger = logging.getLogger(__name__)


@dataclass
class SegmenterSettings:
    """Per-app settings, from ``--conf``."""

    window: IntensityWindow
    labels: LabelMap
    max_voxels: int | None = 512 * 512 * 1200
    encode_batch: int = 8
    feature_dtype: torch.dtype = torch.float32
    stop_rule: StopRule | None = None  # the default for 3D requests; a request can turn it on or off
    slices_to_check: int = 5


@dataclass
class ImageSession:
    """A cached image: its encoded volume, geometry, window, and the prompts given so far (3D)."""

    volume: VolumeSession
    image: LoadedImage
    window: IntensityWindow
    prompts: dict[tuple[str, int], KeySlicePrompt] = field(default_factory=dict)
    label_ranges: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    # the last propagation's low-res logits, and the mask each correction prompt refines
    last_logits: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    prompt_masks: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    @property
    def lock(self):
        return self.volume.lock

    def nbytes(self) -> int:
        masks = [t for per in self.last_logits.values() for t in per.values()] + list(self.prompt_masks.values())
        return self.volume.nbytes() + int(self.image.array.nbytes) + tensor_bytes(masks)

    def add_prompts(self, prompts: list[KeySlicePrompt], correction: bool) -> None:
        """A request's prompts replace those of the labels they name; a correction adds to them instead,
        merging clicks into a prompt already on that slice and refining the slice's last mask."""
        named = {p.label for p in prompts}
        if not correction:
            self.prompts = {k: v for k, v in self.prompts.items() if k[0] not in named}
            self.prompt_masks = {k: v for k, v in self.prompt_masks.items() if k[0] not in named}
        for new in prompts:
            key = (new.label, new.slice_index)
            old = self.prompts.get(key)
            merged = new
            if correction and old is not None and new.box is None:
                points = old.points + new.points
                merged = dataclasses.replace(old, points=points, point_labels=old.point_labels + new.point_labels)
            self.prompts[key] = merged
            self.prompt_masks.pop(key, None)
            previous_mask = self.last_logits.get(new.label, {}).get(new.slice_index)
            if correction and new.box is None and previous_mask is not None:
                self.prompt_masks[key] = previous_mask


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

    def _stop_rule(self, request: dict[str, Any]) -> StopRule | None:
        """The server's default stop rule with the request's overrides applied."""
        options = parse_stop_options(request)
        default = self.settings.stop_rule
        enabled = options.enabled if options.enabled is not None else default is not None
        if not enabled:
            return None
        base = default or StopRule()
        return StopRule(
            base.min_object_score if options.min_object_score is None else options.min_object_score,
            base.patience if options.patience is None else options.patience,
        )

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
        stop_rule = self._stop_rule(request)
        correction = bool(parse_flag(request.get("correction"), "correction"))
        with session.lock:
            if parse_flag(request.get("reset_state"), "reset_state"):
                session.prompts.clear()
                session.prompt_masks.clear()
                session.last_logits = {}
            # a correction whose label has no earlier prompts here: the session is new (e.g. evicted from the
            # cache, see max_sessions) and the earlier key slices are gone; the annotator must be told
            orphaned = sorted({p.label for p in parsed.prompts if correction and p.label not in session.label_ranges})
            session.add_prompts(parsed.prompts, correction)
            for name in {p.label for p in parsed.prompts}:
                if not (correction and name in session.label_ranges):
                    session.label_ranges[name] = parsed.slice_range
            prompts = list(session.prompts.values())
            result = propagate_volume(
                session.volume,
                prompts,
                _union_range(session.label_ranges),
                stop_rule=stop_rule,
                mask_inputs=session.prompt_masks,
            )
            session.last_logits = result.logits
        self.cache.update_size(key)
        t1 = time.perf_counter()
        frames = result.label_frames()
        label = frames_to_volume(frames, axis)
        confidence = slice_confidence(result)
        to_check = slices_to_check(result, confidence, count=self.settings.slices_to_check)
        t2 = time.perf_counter()
        out = self._common_json(session, parsed, reused)
        out["prompts_in_session"] = [p.as_json(axis) for p in prompts]
        out["axis"] = AXIS_NAMES[axis]
        out["coverage"] = result.coverage()
        out["correction"] = correction
        out["stop_rule"] = None if stop_rule is None else dataclasses.asdict(stop_rule)
        out["confidence"] = _per_slice_json(confidence)
        out["object_scores"] = _per_slice_json(result.object_scores)
        out["predicted_iou"] = _per_slice_json(result.predicted_iou)
        out["check_slices"] = {name: [p.as_json() for p in picks] for name, picks in to_check.items()}
        out["hint"] = check_hint(to_check)
        if orphaned:
            warning = (
                f"Correction of {', '.join(orphaned)}: this session holds no earlier prompts for it (it is new, or was "
                "dropped from the server's session cache: --conf max_sessions), so it was propagated from this "
                "request's prompts alone. Send the earlier key slices again with this correction."
            )
            out["warnings"] = [warning]
            out["hint"] = f"{warning} {out['hint']}"
            logger.warning("medsam2_3d on %s: %s", image_path, warning)
        out["latencies"] = {
            **timings,
            **result.latencies,
            "compose": round(t2 - t1, 4),
            "total": round(time.perf_counter() - t0, 4),
        }
        out["slices_per_second"] = round(result.num_slices * len(result.logits) / max(t2 - t0, 1e-9), 2)
        return label, out, image.reference


def _per_slice_json(per_label: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {name: {str(f): round(v, 3) for f, v in sorted(per.items())} for name, per in per_label.items()}


def _union_range(ranges: dict[str, tuple[int, int] | None]) -> tuple[int, int] | None:
    if not ranges or any(r is None for r in ranges.values()):
        return None
    return (min(r[0] for r in ranges.values() if r), max(r[1] for r in ranges.values() if r))
