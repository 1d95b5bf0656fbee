"""What the 2D and 3D tasks do, without MONAI Label: image -> session -> prompts -> label volume + JSON.

The segmenter is a facade over its units: the typed request (:mod:`lib.engine.request`), the shared image and
session cache (:mod:`lib.engine.image_sessions`), 2D answers (:mod:`lib.engine.answer_2d`), 3D propagation
(:mod:`lib.engine.answer_3d`) and undo/redo (:mod:`lib.engine.undo_redo`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lib.engine.answer_2d import SliceAnswers
from lib.engine.answer_3d import VolumeAnswers
from lib.engine.image_sessions import ImageSession, ImageSessions, PreparedImage
from lib.engine.model_provider import ModelProvider
from lib.engine.prompts import LabelMap
from lib.engine.refine import LabelFile
from lib.engine.request import SegmentRequest, parse_segment_request
from lib.engine.segmenter_settings import SegmenterSettings as SegmenterSettings  # re-exported: its old home
from lib.engine.session_limits import SessionLimits
from lib.engine.volume_session import SessionCache

Answer = tuple[np.ndarray, dict[str, Any], Any]  # (label volume (k, j, i) uint8, answer JSON, reference image)


class MedSAM2Segmenter:
    """Serves key-slice (2D) and propagation (3D) requests from cached images and per-annotator sessions.

    ``cache`` holds the prepared images with their encoded slices (bounded in count and bytes); the annotators'
    sessions on them (prompts, answers, undo) are kept in ``sessions`` and dropped with their image. With
    ``encode_ahead``, :meth:`open_ahead` encodes an opened image in the background (:mod:`lib.engine.encode_ahead`).
    """

    def __init__(
        self,
        provider: ModelProvider,
        settings: SegmenterSettings,
        cache: SessionCache,
        encode_ahead: bool = False,
        memory_reserve_bytes: int = 1 << 30,
        limits: SessionLimits | None = None,
    ):
        self.provider = provider
        self.settings = settings
        self.images = ImageSessions(provider, settings, cache, encode_ahead, memory_reserve_bytes, limits)
        self.slices = SliceAnswers(self.images, settings)
        self.volumes = VolumeAnswers(self.images, settings)

    @property
    def cache(self) -> SessionCache:
        return self.images.cache

    @property
    def sessions(self) -> SessionCache:
        return self.images.sessions

    @property
    def ahead(self):
        return self.images.ahead

    def foreground(self):
        """Wrap any use of the model for a request: the background encoder pauses meanwhile."""
        return self.images.foreground()

    def heartbeat(self, image_id: str, session_name: str | None = None) -> int:
        """See :meth:`lib.engine.image_sessions.ImageSessions.heartbeat`."""
        return self.images.heartbeat(image_id, session_name)

    def open_ahead(self, name: str, source: str, image_path: Callable[[], str]) -> bool:
        """See :meth:`lib.engine.image_sessions.ImageSessions.open_ahead`."""
        return self.images.open_ahead(name, source, image_path)

    def warm_up(self) -> float:
        """Run the model once on a small synthetic volume (one label, both directions) so that the first request
        does not pay the kernels' set-up: oneDNN's on a CPU; cuDNN's attention plans and the tracking step's CUDA
        graphs on a GPU (there with enough slices to capture every graph a one-label request replays). Returns
        the seconds it took."""
        t0 = time.perf_counter()
        self.volumes.warm_up()
        return time.perf_counter() - t0

    def open_image(
        self, image_path: str, axis: int, model: torch.nn.Module, timings: dict[str, float] | None = None
    ) -> ImageSession:
        """Read an image (size limit applied), window it and wrap it for the model: nothing encoded yet."""
        prepared = self.prepare_image(image_path, axis, model, timings)
        return ImageSession(prepared.volume, prepared.image, prepared.window)

    def prepare_image(
        self, image_path: str, axis: int, model: torch.nn.Module, timings: dict[str, float] | None = None
    ) -> PreparedImage:
        """Read an image (size limit applied), window it and cut it into frames: nothing encoded yet."""
        return self.images.prepare_image(image_path, axis, model, timings)

    def request(
        self, request: dict[str, Any] | SegmentRequest, dimension: int, labels: LabelMap | None = None
    ) -> SegmentRequest:
        """The typed request: a dict is read once (:func:`lib.engine.request.parse_segment_request`) with
        ``labels``, default the settings' label map; a typed request takes ``labels`` when given."""
        if isinstance(request, SegmentRequest):
            return request.with_labels(labels)
        return parse_segment_request(request, dimension, labels or self.settings.labels)

    def segment_2d(
        self,
        image_path: str,
        request: dict[str, Any] | SegmentRequest,
        label_file: LabelFile | None = None,
        labels: LabelMap | None = None,
    ) -> Answer:
        """One slice from its prompts (box, clicks, scribbles, lasso), or undo/redo (:mod:`lib.engine.answer_2d`);
        the background encoder pauses while it runs."""
        typed = self.request(request, 2, labels)
        with self.foreground():
            return self.slices.answer(image_path, typed, label_file)

    def segment_3d(
        self,
        image_path: str,
        request: dict[str, Any] | SegmentRequest,
        label_file: LabelFile | None = None,
        labels: LabelMap | None = None,
    ) -> Answer:
        """Key-slice prompts propagated through the volume, or undo/redo (:mod:`lib.engine.answer_3d`); the
        background encoder pauses while it runs."""
        typed = self.request(request, 3, labels)
        with self.foreground():
            return self.volumes.answer(image_path, typed, label_file)
