"""The cache shared by the 2D and 3D answers: prepared images (read, windowed, cut into frames, their slices encoded)
and the annotators' sessions on them (prompts, answers, undo history), with the background encoder that fills it."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lib.engine.encode_ahead import EncodeAhead, available_memory
from lib.engine.mask_prompts import merge_strokes
from lib.engine.model_provider import ModelProvider
from lib.engine.preprocessing import IntensityWindow, resolve_window, to_uint8
from lib.engine.prompts import KeySlicePrompt
from lib.engine.propagation import PropagationResult
from lib.engine.refine import BaseLabel
from lib.engine.segmenter_settings import SegmenterSettings
from lib.engine.session_history import Snapshot, UndoHistory
from lib.engine.session_limits import Reaper, SessionLimits, release_memory
from lib.engine.volume_session import SessionCache, VolumeSession, frames_along_axis, tensor_bytes
from lib.errors import PromptError
from lib.imaging.volume_io import LoadedImage, load_image

logger = logging.getLogger(__name__)
IMAGE_SUFFIX = re.compile(r"[A-Za-z0-9]{1,6}(\.gz)?")  # what follows "<image id>." in a datastore's image file


def is_image_of(path: str, image_id: str) -> bool:
    """``path`` is the datastore file of ``image_id`` (``<id>.nii.gz``, ``<id>.nrrd``, ...: both datastores name
    image files so)."""
    name = os.path.basename(path)
    return name.startswith(image_id + ".") and IMAGE_SUFFIX.fullmatch(name[len(image_id) + 1 :]) is not None


@dataclass
class PreparedImage:
    """An image read, windowed and cut into frames along one axis, with its encoded slices: one per image, axis and
    model version, shared by every annotator's session on it and by the background encoder."""

    volume: VolumeSession
    image: LoadedImage
    window: IntensityWindow
    evicted: threading.Event = field(default_factory=threading.Event)  # set when the cache drops it
    grew: Callable[[], None] = lambda: None  # tells the cache to re-measure it

    def nbytes(self) -> int:
        return self.volume.nbytes() + int(self.image.array.nbytes)


@dataclass(frozen=True)
class LastPropagation:
    """A session's last 3D answer and what it depended on besides each label's own prompts: a follow-up with the
    same ``signature`` recomputes only the labels it names and keeps the others' answers (an exact reuse: labels
    are propagated independently)."""

    signature: tuple  # (slice range, stop rule, scribble mode)
    result: PropagationResult


def _without_memory(run: LastPropagation | None) -> LastPropagation | None:
    """The answer without its tracking memory: undo snapshots keep answers, not what local corrections reuse (an
    undone state's next correction recomputes the label in full)."""
    if run is None or run.result.memory is None:
        return run
    return dataclasses.replace(run, result=dataclasses.replace(run.result, memory=None))


@dataclass
class ImageSession:
    """A cached image: its encoded volume, geometry, window, and one annotator's state on it (prompts, the label
    being refined, the last answer's logits) with the undo history of that state."""

    volume: VolumeSession
    image: LoadedImage
    window: IntensityWindow
    prompts: dict[tuple[str, int], KeySlicePrompt] = field(default_factory=dict)
    label_ranges: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    # the last propagation's low-res logits, and the mask each correction prompt refines
    last_logits: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    prompt_masks: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    base: BaseLabel | None = None  # the label being refined, as frames along the session's axis
    history: UndoHistory | None = None
    last_run: LastPropagation | None = None
    # names the session's states to clients (answer_id "<uid>.<n>"): unique across sessions and server restarts
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    answers: int = 0

    @property
    def lock(self):
        return self.volume.lock

    def nbytes(self) -> int:
        """Bytes of this annotator's state (the image and its encoded slices are counted in the image cache)."""
        masks = [t for per in self.last_logits.values() for t in per.values()] + list(self.prompt_masks.values())
        extra = (self.base.frames.nbytes if self.base is not None else 0) + (
            self.history.nbytes() if self.history else 0
        )
        memory = self.last_run.result.memory if self.last_run is not None else None
        return tensor_bytes(masks) + extra + (memory.nbytes() if memory is not None else 0)

    def state(self) -> dict[str, Any]:
        """What undo restores (the dicts are copied; the tensors and arrays in them are never changed in place)."""
        return {
            "prompts": dict(self.prompts),
            "label_ranges": dict(self.label_ranges),
            "last_logits": self.last_logits,
            "prompt_masks": dict(self.prompt_masks),
            "base": self.base,
            "last_run": _without_memory(self.last_run),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.prompts = dict(state["prompts"])
        self.label_ranges = dict(state["label_ranges"])
        self.last_logits = dict(state["last_logits"])
        self.prompt_masks = dict(state["prompt_masks"])
        self.base = state["base"]
        self.last_run = state.get("last_run")

    def undo_history(self, levels: int) -> UndoHistory:
        if self.history is None:
            self.history = UndoHistory(Snapshot.of(self.state(), None, {}, "start", f"{self.uid}.0"), levels)
        return self.history

    def next_answer_id(self) -> str:
        self.answers += 1
        return f"{self.uid}.{self.answers}"

    def add_prompts(self, prompts: list[KeySlicePrompt], correction: bool) -> None:
        """A request's prompts replace those of the labels they name; a correction adds to them instead,
        merging clicks and strokes into a prompt already on that slice and refining the slice's last mask."""
        named = {p.label for p in prompts}
        if not correction:
            self.prompts = {k: v for k, v in self.prompts.items() if k[0] not in named}
            self.prompt_masks = {k: v for k, v in self.prompt_masks.items() if k[0] not in named}
        for new in prompts:
            key = (new.label, new.slice_index)
            old = self.prompts.get(key)
            merged = new
            if correction and old is not None and new.box is None:
                merged = dataclasses.replace(
                    old,
                    points=old.points + new.points,
                    point_labels=old.point_labels + new.point_labels,
                    strokes=merge_strokes(old.strokes, new.strokes),
                )
            self.prompts[key] = merged
            self.prompt_masks.pop(key, None)
            previous_mask = self.last_logits.get(new.label, {}).get(new.slice_index)
            if correction and new.box is None and previous_mask is not None:
                self.prompt_masks[key] = previous_mask


EMPTY_STATE: dict[str, Any] = {
    "prompts": {},
    "label_ranges": {},
    "last_logits": {},
    "prompt_masks": {},
    "base": None,
    "last_run": None,
}


class ImageSessions:
    """Prepared images (bounded in count and bytes by ``cache``) and the annotators' sessions on them
    (``sessions``, dropped with their image). With ``encode_ahead``, :meth:`open_ahead` encodes an opened image in
    the background (:mod:`lib.engine.encode_ahead`)."""

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
        self.cache = cache
        cache.on_evict = self._image_evicted
        self.limits = limits or SessionLimits()
        room = max(8 * cache.max_sessions, self.limits.max_live)
        self.sessions = SessionCache(max_sessions=room, max_bytes=cache.max_bytes)
        self._admit_lock = threading.Lock()
        self._opening = 0  # sessions being created now (admitted, not yet in the cache)
        every_s = self.limits.reap_every_s
        reap = self.limits.idle_s > 0 and self.limits.reap_in_background
        self.reaper = Reaper(self.reap_idle, every_s) if reap else None
        self.memory_reserve_bytes = memory_reserve_bytes
        # a request waits for the chunk in flight at most: one slice at a time on a CPU (where a batch saves nothing)
        chunk = settings.encode_batch if provider.device.type == "cuda" else 1
        self.ahead = EncodeAhead(self._room_for, chunk=chunk) if encode_ahead else None

    def _image_evicted(self, key: Any, prepared: PreparedImage) -> None:
        prepared.evicted.set()
        self.sessions.drop_where(lambda session_key, _: session_key[0] == key)

    def _room_for(self, prepared: PreparedImage, nbytes: int) -> str | None:
        """Why the background encoder must not cache ``nbytes`` more (None: it may)."""
        if self.cache.total_bytes() + nbytes > self.cache.max_bytes:
            return "the session cache is full (--conf max_session_gb)"
        available = available_memory()
        if available is not None and available - nbytes < self.memory_reserve_bytes:
            return f"the machine's free memory is short ({available / 2**30:.1f} GiB available)"
        return None

    def foreground(self):
        """Wrap any use of the model for a request: the background encoder pauses meanwhile."""
        return self.ahead.foreground() if self.ahead is not None else nullcontext()

    def open_ahead(self, name: str, source: str, image_path: Callable[[], str]) -> bool:
        """Encode an image a viewer opened, in the background (``image_path`` may download it: it runs there too).
        False when encode-ahead is off or the image is already queued or encoded."""
        if self.ahead is None:
            return False

        def prepare() -> PreparedImage:
            path = image_path()
            model, version = self.provider.get()
            return self.prepared(path, axis=2, model=model, version=version)[0]

        return self.ahead.submit(name, source, prepare)

    def volume(self, frames: np.ndarray, model: torch.nn.Module) -> VolumeSession:
        provider, settings = self.provider, self.settings
        return VolumeSession(
            frames, model, provider.device, provider.compute_dtype, settings.feature_dtype, settings.encode_batch
        )

    def prepare_image(
        self, image_path: str, axis: int, model: torch.nn.Module, timings: dict[str, float] | None = None
    ) -> PreparedImage:
        """Read an image (size limit applied), window it and cut it into frames: nothing encoded yet."""
        t1 = time.perf_counter()
        image = load_image(image_path, self.settings.max_voxels)
        t2 = time.perf_counter()
        window = resolve_window(self.settings.window, image.array)
        frames = frames_along_axis(to_uint8(image.array, window), axis)
        volume = self.volume(frames, model)
        if timings is not None:
            timings["load"] = round(t2 - t1, 4)
            timings["preprocess"] = round(time.perf_counter() - t2, 4)
        return PreparedImage(volume, image, window)

    def prepared(
        self,
        image_path: str,
        axis: int,
        model: torch.nn.Module,
        version: int,
        timings: dict | None = None,
    ) -> tuple[PreparedImage, bool, tuple]:
        """The cached prepared image (created when missing): (image, created, cache key)."""
        try:
            st = os.stat(image_path)
            stamp = (st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):
            raise PromptError("The image was not found in the datastore. Check the image id.", status=404) from None
        key = (os.path.realpath(image_path), stamp, axis, self.settings.window, version)

        def create() -> PreparedImage:
            prepared = self.prepare_image(image_path, axis, model, timings)
            prepared.grew = lambda: self.cache.update_size(key)
            return prepared

        prepared, created = self.cache.get_or_create(key, create)
        return prepared, created, key

    def session(self, image_path: str, session_name: str, axis: int) -> tuple[ImageSession, bool, dict, tuple]:
        """The annotator's session on the image (created when missing): (session, reused, timings, session key).
        "reused" is the annotator's session (prompts, answers): an image encoded ahead or for someone else is not."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        model, version = self.provider.get()
        timings["model"] = round(time.perf_counter() - t0, 4)
        prepared, _, image_key = self.prepared(image_path, axis, model, version, timings)
        key = (image_key, session_name)
        admitted = key not in self.sessions and self._admit()
        try:
            session, created = self.sessions.get_or_create(
                key, lambda: ImageSession(prepared.volume, prepared.image, prepared.window)
            )
        finally:
            if admitted:
                with self._admit_lock:
                    self._opening -= 1
        return session, not created, timings, key

    def _full(self) -> bool:
        cap = self.limits.max_live
        return cap > 0 and len(self.sessions) + self._opening >= cap

    def _admit(self) -> bool:
        """Room for one more session (idle ones dropped first if needed), else :class:`TooManySessions` (429)."""
        if self.limits.max_live <= 0:
            return False
        with self._admit_lock:
            if self._full():
                self.reap_idle()
            if self._full():
                idle = self.sessions.idle_for()
                raise self.limits.refusal(max(idle.values()) if idle else None)
            self._opening += 1
        return True

    def heartbeat(self, image_id: str, session_name: str | None = None) -> int:
        """A viewer still has ``image_id`` open: its sessions (all, or the one named) and their images count as
        used now. Returns how many sessions it kept; with none and the cap reached, :class:`TooManySessions`."""

        def named(key: tuple, _: Any) -> bool:
            return is_image_of(key[0][0], image_id) and (session_name is None or key[1] == session_name)

        kept = self.sessions.touch(named)
        images = {key[0] for key in kept}
        self.cache.touch(lambda key, _: key in images or is_image_of(key[0], image_id))
        if not kept and self.limits.max_live > 0:
            with self._admit_lock:
                if self._full():
                    self.reap_idle()
                if self._full():
                    idle = self.sessions.idle_for()
                    raise self.limits.refusal(max(idle.values()) if idle else None)
        return len(kept)

    def reap_idle(self) -> int:
        """Drop the sessions idle for ``limits.idle_s`` and the images no session uses that are idle as long, then
        give the memory back; how many were dropped."""
        if self.limits.idle_s <= 0:
            return 0
        sessions = self.sessions.drop_idle(self.limits.idle_s)
        in_use = {key[0] for key in self.sessions.idle_for()}
        images = self.cache.drop_idle(self.limits.idle_s, keep=lambda key: key in in_use)
        if sessions or images:
            release_memory()
            logger.info(
                "Dropped %d annotation sessions and %d images idle for %g s or more (--conf session_idle_timeout_s)",
                len(sessions),
                len(images),
                self.limits.idle_s,
            )
        return len(sessions) + len(images)

    def update_sizes(self, key: tuple) -> None:
        """Re-measure a session and its image after a request (more slices encoded, a longer history)."""
        self.sessions.update_size(key)
        self.cache.update_size(key[0])
