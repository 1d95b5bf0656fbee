"""3D answers: key-slice prompts propagated through the volume, all labels of the annotator's session at once; a
correction adds to a label's prompts; a refine of a base label changes only the slices :mod:`lib.engine.refine`
allows; labels a follow-up does not name keep their last answer. :meth:`VolumeAnswers.track` is the one place that
runs the propagation (:func:`lib.engine.propagation.propagate_volume`); a correction of one label on one slice is
re-tracked locally where it can be (:func:`lib.engine.local_correction.correct_locally`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch

from lib.engine.confidence import check_hint, slice_confidence, slices_to_check
from lib.engine.image_sessions import EMPTY_STATE, ImageSession, ImageSessions, LastPropagation
from lib.engine.local_correction import correct_locally
from lib.engine.prompts import AXIS_NAMES, KeySlicePrompt, ParsedRequest
from lib.engine.propagation import PropagationResult, StopRule, TrackingOptions, propagate_volume
from lib.engine.refine import BaseLabel, LabelFile, boundary_prompts, compose_with_base, painted_axis, refine_range
from lib.engine.request import SegmentRequest
from lib.engine.request_inputs import (
    answer_json,
    decode_label_file,
    key_slice_prompts,
    last_answer_base,
    sam2_prompt,
)
from lib.engine.segmenter_settings import SegmenterSettings
from lib.engine.undo_redo import held_state, record, replay
from lib.engine.volume_session import VolumeSession, frames_to_volume
from lib.errors import PromptError
from lib.imaging.volume_io import read_label_values

logger = logging.getLogger(__name__)


class VolumeAnswers:
    """Serves ``medsam2_3d`` and ``medsam2_scribbles`` requests from the shared image sessions."""

    def __init__(self, images: ImageSessions, settings: SegmenterSettings):
        self.images = images
        self.settings = settings

    def track(
        self,
        volume: VolumeSession,
        prompts: list[KeySlicePrompt],
        span: tuple[int, int] | None = None,
        stop_rule: StopRule | None = None,
        mask_inputs: dict[tuple[str, int], torch.Tensor] | None = None,
        tracking: TrackingOptions | None = None,
    ) -> PropagationResult:
        """Segment the key slices and propagate them through ``span`` (the one call of the propagation)."""
        tracking = tracking or self.settings.tracking
        return propagate_volume(volume, prompts, span, stop_rule=stop_rule, mask_inputs=mask_inputs, tracking=tracking)

    def tracking_for(self, request: SegmentRequest) -> TrackingOptions:
        """The server's tracking options with the request's ``tracking_region`` (a request asking for ``roi`` gets
        a 422 where no region can be formed, instead of the whole frame)."""
        region = request.tracking_region
        if region is None:
            return self.settings.tracking
        return dataclasses.replace(self.settings.tracking, region=region, strict=region == "roi")

    def warm_up(self) -> None:
        """Run the model once on a small synthetic volume (one label, both directions): see
        :meth:`lib.engine.segmenter.MedSAM2Segmenter.warm_up`."""
        model, _ = self.images.provider.get()
        size = int(model.image_size)
        steps = model.max_obj_ptrs_in_encoder if self.images.provider.device.type == "cuda" else 1
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, size=(2 * steps + 1, size, size), dtype=np.uint8)
        volume = self.images.volume(frames, model)
        box = (size / 4, size / 4, 3 * size / 4, 3 * size / 4)
        with self.images.foreground():
            self.track(volume, [KeySlicePrompt("warm-up", 1, steps, box=box)])

    def answer(
        self, image_path: str, request: SegmentRequest, label_file: LabelFile | None = None
    ) -> tuple[np.ndarray, dict[str, Any], Any]:
        """The session's labels propagated, or undo/redo. Returns (label volume (k, j, i) uint8, answer JSON,
        reference image)."""
        t0 = time.perf_counter()
        axis = self._axis(request, label_file)
        session, reused, timings, key = self.images.session(image_path, request.session_name, axis)
        if session.volume.num_slices < 2:
            raise PromptError("This image has a single slice: use the 2D model (medsam2_2d) for 2D images.")
        stop_rule = self._stop_rule(request)
        with session.lock:
            history = session.undo_history(self.settings.undo_levels)
            since = held_state(history, request)
            if request.history_step:
                return replay(session, history, request, since, t0)
            before = session.state()
            if request.reset_state:
                session.restore(EMPTY_STATE)
            try:
                label, out, result, t1 = self._propagate(session, request, label_file, axis, stop_rule, reused)
            except Exception:
                session.restore(before)  # a refused request leaves the session as it was
                raise
            for warning in out.get("warnings", []):
                logger.warning("medsam2_3d on %s: %s", image_path, warning)
            record(session, history, label, out, request, since)
        self.images.update_sizes(key)
        t2 = time.perf_counter()
        out["latencies"] = {
            **timings,
            **result.latencies,
            "compose": round(t2 - t1, 4),
            "total": round(time.perf_counter() - t0, 4),
        }
        out["slices_per_second"] = round(result.num_slices * len(result.logits) / max(t2 - t0, 1e-9), 2)
        return label, out, session.image.reference

    def _propagate(
        self,
        session: ImageSession,
        request: SegmentRequest,
        label_file: LabelFile | None,
        axis: int,
        stop_rule: StopRule | None,
        reused: bool,
    ) -> tuple[np.ndarray, dict[str, Any], PropagationResult, float]:
        """Update the session with the request's prompts and propagate: (label, answer JSON, result, compose start)."""
        decoded = decode_label_file(session, request, label_file, axis)
        parsed = key_slice_prompts(request, session.image.array.shape, decoded, axis)
        levels = self.settings.undo_levels
        base = decoded.base if decoded is not None else last_answer_base(session, request, axis, levels)
        refining = base is not None or decoded is not None
        correction = request.correction
        orphaned = sorted({p.label for p in parsed.prompts if correction and p.label not in session.label_ranges})
        _update_state(session, parsed, base, refining, correction)
        mode = request.scribble_mode or self.settings.scribble_mode
        prompts = _session_prompts(session, mode)
        span = _union_range(session.label_ranges)
        tracking = self.tracking_for(request)
        signature = (span, stop_rule, mode, tracking.region, tracking.max_key_slices)
        kept = _unchanged_labels(session, signature, {p.label for p in parsed.prompts}, refining)
        ready = _ready_at_request(session.volume, session.label_ranges, prompts)
        result = self._local_correction(session, parsed, prompts, signature, refining, correction, tracking, span)
        if result is not None:  # the other labels keep their answers
            kept = sorted(set(result.logits) - {p.label for p in parsed.prompts})
        else:
            result = self.track(
                session.volume,
                [p for p in prompts if p.label not in kept],
                span,
                stop_rule=stop_rule,
                mask_inputs=session.prompt_masks,
                tracking=tracking,
            )
            if kept:
                result = result.with_labels_from(session.last_run.result, kept)
        session.last_run = LastPropagation(signature, result)
        session.last_logits = result.logits
        t1 = time.perf_counter()
        frames = result.label_frames()
        if session.base is not None:
            frames = compose_with_base(session.base, frames, _spans(session))
        label = frames_to_volume(frames, axis)
        out = self._answer_json(session, request, parsed, reused, result, stop_rule, orphaned)
        out["session"]["ready_at_request"] = ready
        out["session"]["labels_recomputed"] = sorted(set(result.logits) - set(kept))
        return label, out, result, t1

    def _local_correction(
        self,
        session: ImageSession,
        parsed: ParsedRequest,
        prompts: list[KeySlicePrompt],
        signature: tuple,
        refining: bool,
        correction: bool,
        tracking: TrackingOptions,
        span: tuple[int, int] | None,
    ) -> PropagationResult | None:
        """A correction of one label on one slice, re-tracked from that slice only (None: recompute in full)."""
        rule = self.settings.local_corrections
        last = session.last_run
        names = {p.label for p in parsed.prompts}
        slices = {p.slice_index for p in parsed.prompts}
        if rule is None or not correction or refining or session.base is not None or signature[1] is not None:
            return None
        if last is None or last.signature != signature or len(names) != 1 or len(slices) != 1:
            return None
        (name,), (corrected,) = names, slices
        mine = [p for p in prompts if p.label == name]
        return correct_locally(
            session.volume, last.result, mine, corrected, rule, tracking, span, mask_inputs=session.prompt_masks
        )

    def _axis(self, request: SegmentRequest, label_file: LabelFile | None) -> int:
        """The request's axis; for scribbles painted into an uploaded label with no axis named, the axis they
        were painted across."""
        if request.axis is not None or label_file is None or label_file.source != "upload":
            return request.propagation_axis
        values = read_label_values(label_file.path, self.settings.max_voxels)
        if values.ndim != 3:
            return 2  # not a 3D label: refused with a reason when it is read on the image's grid
        target = request.labels.resolve(request.target_label)
        return painted_axis(values, label_file, request.labels, target)

    def _stop_rule(self, request: SegmentRequest) -> StopRule | None:
        """The server's default stop rule with the request's overrides applied."""
        options = request.stop
        default = self.settings.stop_rule
        enabled = options.enabled if options.enabled is not None else default is not None
        if not enabled:
            return None
        base = default or StopRule()
        return StopRule(
            base.min_object_score if options.min_object_score is None else options.min_object_score,
            base.patience if options.patience is None else options.patience,
        )

    def _answer_json(
        self,
        session: ImageSession,
        request: SegmentRequest,
        parsed: ParsedRequest,
        reused: bool,
        result: PropagationResult,
        stop_rule: StopRule | None,
        orphaned: list[str],
    ) -> dict[str, Any]:
        axis = parsed.axis
        confidence = slice_confidence(result)
        to_check = slices_to_check(result, confidence, count=self.settings.slices_to_check)
        out = answer_json(session, parsed, reused, request, self.images.provider)
        out["prompts_in_session"] = [p.as_json(axis) for p in session.prompts.values()]
        out["axis"] = AXIS_NAMES[axis]
        out["coverage"] = result.coverage()
        out["tracking"] = result.tracking
        out["correction"] = request.correction
        out["stop_rule"] = None if stop_rule is None else dataclasses.asdict(stop_rule)
        out["confidence"] = _per_slice_json(confidence)
        out["object_scores"] = _per_slice_json(result.object_scores)
        out["predicted_iou"] = _per_slice_json(result.predicted_iou)
        out["check_slices"] = {name: [p.as_json() for p in picks] for name, picks in to_check.items()}
        out["hint"] = check_hint(to_check)
        if session.base is not None:
            out["refined_from"] = session.base.source
            out["changed_slices"] = {name: list(span) for name, span in _spans_by_name(session).items()}
        if orphaned:
            warning = (
                f"Correction of {', '.join(orphaned)}: this session holds no earlier prompts for it (it is new, or was "
                "dropped from the server's session cache: --conf max_sessions), so it was propagated from this "
                "request's prompts alone. Send the earlier key slices again with this correction."
            )
            out["warnings"] = [warning]
            out["hint"] = f"{warning} {out['hint']}"
        return out


def _update_state(
    session: ImageSession, parsed: ParsedRequest, base: BaseLabel | None, refining: bool, correction: bool
) -> None:
    named = {p.label: p.label_value for p in parsed.prompts}
    if refining:  # the base label supersedes the session's earlier prompts: start over from it
        session.restore({**EMPTY_STATE, "base": base})
    elif not correction and session.base is not None:
        session.base = session.base.without(named.values())
    session.add_prompts(parsed.prompts, correction)
    n = session.volume.num_slices
    for name, value in named.items():
        if refining:
            keys = [k for (label, k) in session.prompts if label == name]
            session.label_ranges[name] = refine_range(keys, parsed.slice_range, base, value, n)
        elif not (correction and name in session.label_ranges):
            session.label_ranges[name] = parsed.slice_range


def _session_prompts(session: ImageSession, scribble_mode: str) -> list[KeySlicePrompt]:
    """The session's prompts as SAM2 takes them, plus the base's masks bounding each refined label's span."""
    _, rows, cols = session.volume.frames.shape
    prompts = [
        sam2_prompt(p, session.base, scribble_mode, rows, cols, session.prompt_masks.get(key))
        for key, p in session.prompts.items()
    ]
    if session.base is not None:
        values = _label_values(session)
        for name, (lo, hi) in _spans_by_name(session).items():
            prompts += boundary_prompts(session.base, name, values[name], (lo, hi))
    return prompts


def _label_values(session: ImageSession) -> dict[str, int]:
    """The value of each label the session holds prompts for (as the request that named it resolved it)."""
    return {p.label: p.label_value for p in session.prompts.values()}


def _spans_by_name(session: ImageSession) -> dict[str, tuple[int, int]]:
    n = session.volume.num_slices
    names = {p.label for p in session.prompts.values()}
    return {name: session.label_ranges.get(name) or (0, n - 1) for name in sorted(names)}


def _spans(session: ImageSession) -> dict[int, tuple[int, int]]:
    values = _label_values(session)
    return {values[k]: v for k, v in _spans_by_name(session).items()}


def _per_slice_json(per_label: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {name: {str(f): round(v, 3) for f, v in sorted(per.items())} for name, per in per_label.items()}


def _unchanged_labels(session: ImageSession, signature: tuple, named: set[str], refining: bool) -> list[str]:
    """The session's labels whose last answer still holds: not named by this request, nothing else changed."""
    last = session.last_run
    if refining or session.base is not None or last is None or last.signature != signature:
        return []
    labels = {label for label, _ in session.prompts}
    return sorted(label for label in labels - named if label in last.result.logits)


def _ready_at_request(
    volume: VolumeSession, ranges: dict[str, tuple[int, int] | None], prompts: list[KeySlicePrompt]
) -> dict[str, int]:
    """How many of the slices a propagation needs were encoded when the request came (e.g. by encode-ahead)."""
    lo, hi = _union_range(ranges) or (0, volume.num_slices - 1)
    keys = [p.slice_index for p in prompts] or [lo]
    needed = range(min(lo, *keys), max(hi, *keys) + 1)
    return {"slices": volume.encoded_count(needed), "needed": len(needed)}


def _union_range(ranges: dict[str, tuple[int, int] | None]) -> tuple[int, int] | None:
    if not ranges or any(r is None for r in ranges.values()):
        return None
    return (min(r[0] for r in ranges.values() if r), max(r[1] for r in ranges.values() if r))
