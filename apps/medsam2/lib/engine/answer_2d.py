"""2D answers: one slice from its prompts (box, clicks, scribbles, lasso), every label of the request decoded on
the slice's cached features; with a base label, the answer is the base with that slice redone."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from lib.engine.image_sessions import ImageSession, ImageSessions
from lib.engine.propagation import compose_labels, segment_key_slice
from lib.engine.refine import LabelFile
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


class SliceAnswers:
    """Serves ``medsam2_2d`` requests from the shared image sessions."""

    def __init__(self, images: ImageSessions, settings: SegmenterSettings):
        self.images = images
        self.settings = settings

    def answer(
        self, image_path: str, request: SegmentRequest, label_file: LabelFile | None = None
    ) -> tuple[np.ndarray, dict[str, Any], Any]:
        """One slice, or undo/redo. Returns (label volume (k, j, i) uint8, answer JSON, reference image)."""
        t0 = time.perf_counter()
        session, reused, timings, key = self.images.session(image_path, request.session_name, axis=2)
        with session.lock:
            history = session.undo_history(self.settings.undo_levels)
            since = held_state(history, request)
            if request.history_step:
                return replay(session, history, request, since, t0)
            label, result = self._segment(session, request, label_file, reused, timings)
            record(session, history, label, result, request, since)
        self.images.update_sizes(key)
        timings["total"] = round(time.perf_counter() - t0, 4)
        result["latencies"] = timings
        return label, result, session.image.reference

    def _segment(
        self,
        session: ImageSession,
        request: SegmentRequest,
        label_file: LabelFile | None,
        reused: bool,
        timings: dict[str, float],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The slice's masks for every label of the request, written into the base label (or an empty one)."""
        image, volume = session.image, session.volume
        _, rows, cols = volume.frames.shape
        decoded = decode_label_file(session, request, label_file, axis=2)
        parsed = key_slice_prompts(request, image.array.shape, decoded)
        base = decoded.base if decoded is not None else last_answer_base(session, request, 2, self.settings.undo_levels)
        mode = request.scribble_mode or self.settings.scribble_mode
        prompts = [sam2_prompt(p, base, mode, rows, cols) for p in parsed.prompts]
        index = prompts[0].slice_index
        t1 = time.perf_counter()
        encoded_before = volume.is_encoded(index)
        volume.encode([index])
        t2 = time.perf_counter()
        logits = [segment_key_slice(volume, p)["pred_masks"] for p in prompts]
        t3 = time.perf_counter()
        slice_label = compose_labels(torch.cat(logits, dim=1), [p.label_value for p in prompts], rows, cols)[0]
        label = np.zeros(image.array.shape, dtype=np.uint8) if base is None else base.frames.copy()
        for p in prompts:
            label[index][label[index] == p.label_value] = 0
        label[index][slice_label > 0] = slice_label[slice_label > 0]
        result = answer_json(session, parsed, reused, request, self.images.provider)
        result["slice_encoded_before"] = encoded_before
        result["num_labelled_pixels"] = int((slice_label > 0).sum())
        if base is not None:
            result["refined_from"] = base.source
        timings.update(encode=round(t2 - t1, 4), decode=round(t3 - t2, 4), post=round(time.perf_counter() - t3, 4))
        return label, result
