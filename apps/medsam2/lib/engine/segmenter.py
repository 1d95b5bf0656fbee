"""What the 2D and 3D tasks do, without MONAI Label: image -> session -> prompts -> label volume + JSON."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lib.engine.confidence import check_hint, slice_confidence, slices_to_check
from lib.engine.encode_ahead import EncodeAhead, available_memory
from lib.engine.mask_prompts import merge_strokes, resolve_drawn
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
    roi_slice_range,
    slice_shape,
)
from lib.engine.propagation import (
    PropagationResult,
    StopRule,
    compose_labels,
    propagate_volume,
    segment_key_slice,
    upsample_logits,
)
from lib.engine.refine import (
    BaseLabel,
    DecodedLabel,
    LabelFile,
    boundary_prompts,
    compose_with_base,
    decode_label,
    painted_axis,
    painted_prompts,
    refine_range,
)
from lib.engine.session_history import Snapshot, UndoHistory
from lib.engine.volume_session import SessionCache, VolumeSession, frames_along_axis, frames_to_volume, tensor_bytes
from lib.imaging.volume_io import LoadedImage, load_image, load_label_on, read_label_values

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
    scribble_mode: str = "points"  # how scribbles reach SAM2: sampled clicks or a mask (bench/scribble_prompts.py)
    undo_levels: int = 16


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

    @property
    def lock(self):
        return self.volume.lock

    def nbytes(self) -> int:
        """Bytes of this annotator's state (the image and its encoded slices are counted in the image cache)."""
        masks = [t for per in self.last_logits.values() for t in per.values()] + list(self.prompt_masks.values())
        extra = (self.base.frames.nbytes if self.base is not None else 0) + (
            self.history.nbytes() if self.history else 0
        )
        return tensor_bytes(masks) + extra

    def state(self) -> dict[str, Any]:
        """What undo restores (the dicts are copied; the tensors and arrays in them are never changed in place)."""
        return {
            "prompts": dict(self.prompts),
            "label_ranges": dict(self.label_ranges),
            "last_logits": self.last_logits,
            "prompt_masks": dict(self.prompt_masks),
            "base": self.base,
            "last_run": self.last_run,
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
            self.history = UndoHistory(Snapshot.of(self.state(), None, {}, "start"), levels)
        return self.history

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
    ):
        self.provider = provider
        self.settings = settings
        self.cache = cache
        cache.on_evict = self._image_evicted
        self.sessions = SessionCache(max_sessions=8 * cache.max_sessions, max_bytes=cache.max_bytes)
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
            return self._prepared(path, axis=2, model=model, version=version)[0]

        return self.ahead.submit(name, source, prepare)

    def warm_up(self) -> float:
        """Run the model once on a small synthetic volume (one label, both directions) so that the first request
        does not pay the kernels' set-up: oneDNN's on a CPU; cuDNN's attention plans and the tracking step's CUDA
        graphs on a GPU (there with enough slices to capture every graph a one-label request replays). Returns
        the seconds it took."""
        t0 = time.perf_counter()
        model, _ = self.provider.get()
        size = int(model.image_size)
        steps = model.max_obj_ptrs_in_encoder if self.provider.device.type == "cuda" else 1
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, size=(2 * steps + 1, size, size), dtype=np.uint8)
        volume = self._volume(frames, model)
        box = (size / 4, size / 4, 3 * size / 4, 3 * size / 4)
        with self.foreground():
            propagate_volume(volume, [KeySlicePrompt("warm-up", 1, steps, box=box)])
        return time.perf_counter() - t0

    def _volume(self, frames: np.ndarray, model: torch.nn.Module) -> VolumeSession:
        provider, settings = self.provider, self.settings
        return VolumeSession(
            frames, model, provider.device, provider.compute_dtype, settings.feature_dtype, settings.encode_batch
        )

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
        t1 = time.perf_counter()
        image = load_image(image_path, self.settings.max_voxels)
        t2 = time.perf_counter()
        window = resolve_window(self.settings.window, image.array)
        frames = frames_along_axis(to_uint8(image.array, window), axis)
        volume = self._volume(frames, model)
        if timings is not None:
            timings["load"] = round(t2 - t1, 4)
            timings["preprocess"] = round(time.perf_counter() - t2, 4)
        return PreparedImage(volume, image, window)

    def _prepared(
        self, image_path: str, axis: int, model: torch.nn.Module, version: int, timings: dict | None = None
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

    def _session(
        self, image_path: str, request: dict[str, Any], axis: int
    ) -> tuple[ImageSession, bool, dict[str, float], tuple]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        model, version = self.provider.get()
        timings["model"] = round(time.perf_counter() - t0, 4)
        prepared, _, image_key = self._prepared(image_path, axis, model, version, timings)
        user = str(request.get("annotation_session") or request.get("client_id") or "default")
        key = (image_key, user)
        # "reused" is the annotator's session (prompts, answers): an image encoded ahead or for someone else is not
        session, created = self.sessions.get_or_create(
            key, lambda: ImageSession(prepared.volume, prepared.image, prepared.window)
        )
        return session, not created, timings, key

    def _update_sizes(self, key: tuple) -> None:
        self.sessions.update_size(key)
        self.cache.update_size(key[0])

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
            "session": {
                "reused": reused,
                "slices_encoded_total": session.volume.slices_encoded,
                "encoded_ahead": session.volume.slices_encoded_ahead,
            },
        }

    def segment_2d(
        self, image_path: str, request: dict[str, Any], label_file: LabelFile | None = None
    ) -> tuple[np.ndarray, dict[str, Any], Any]:
        """See :meth:`_segment_2d` (the background encoder pauses while it runs)."""
        with self.foreground():
            return self._segment_2d(image_path, request, label_file)

    def segment_3d(
        self, image_path: str, request: dict[str, Any], label_file: LabelFile | None = None
    ) -> tuple[np.ndarray, dict[str, Any], Any]:
        """See :meth:`_segment_3d` (the background encoder pauses while it runs)."""
        with self.foreground():
            return self._segment_3d(image_path, request, label_file)

    def _segment_2d(
        self, image_path: str, request: dict[str, Any], label_file: LabelFile | None = None
    ) -> tuple[np.ndarray, dict[str, Any], Any]:
        """One slice from its prompts (box, clicks, scribbles, lasso), or undo/redo. Returns (label volume (k, j, i)
        uint8, result JSON, reference image); with a base label, the answer is the base with that slice redone."""
        t0 = time.perf_counter()
        session, reused, timings, key = self._session(image_path, request, axis=2)
        with session.lock:
            history = session.undo_history(self.settings.undo_levels)
            step = history_step(request)
            if step:
                return self._replay(session, history, step, t0)
            image, volume = session.image, session.volume
            _, rows, cols = volume.frames.shape
            decoded = self._decode(session, request, label_file, axis=2)
            parsed = self._parse(request, image.array.shape, decoded, dimension=2)
            base = decoded.base if decoded is not None else self._last_answer(session, request, axis=2)
            prompts = [self._resolve(p, base, request, rows, cols) for p in parsed.prompts]
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
            result = self._common_json(session, parsed, reused)
            result["slice_encoded_before"] = encoded_before
            result["num_labelled_pixels"] = int((slice_label > 0).sum())
            if base is not None:
                result["refined_from"] = base.source
            self._push(session, history, label, result, "medsam2_2d")
        self._update_sizes(key)
        result["latencies"] = {
            **timings,
            "encode": round(t2 - t1, 4),
            "decode": round(t3 - t2, 4),
            "post": round(time.perf_counter() - t3, 4),
            "total": round(time.perf_counter() - t0, 4),
        }
        return label, result, image.reference

    def _segment_3d(
        self, image_path: str, request: dict[str, Any], label_file: LabelFile | None = None
    ) -> tuple[np.ndarray, dict[str, Any], Any]:
        """Key-slice prompts propagated through the volume, all labels of the session at once; a refine of a base
        label changes only the slices :mod:`lib.engine.refine` allows; or undo/redo."""
        t0 = time.perf_counter()
        axis = self._axis_3d(request, label_file)
        session, reused, timings, key = self._session(image_path, request, axis=axis)
        if session.volume.num_slices < 2:
            raise PromptError("This image has a single slice: use the 2D model (medsam2_2d) for 2D images.")
        stop_rule = self._stop_rule(request)
        correction = bool(parse_flag(request.get("correction"), "correction"))
        with session.lock:
            history = session.undo_history(self.settings.undo_levels)
            step = history_step(request)
            if step:
                return self._replay(session, history, step, t0)
            if parse_flag(request.get("reset_state"), "reset_state"):
                session.restore(_EMPTY_STATE)
            decoded = self._decode(session, request, label_file, axis)
            parsed = self._parse(request, session.image.array.shape, decoded, dimension=3, axis=axis)
            base = decoded.base if decoded is not None else self._last_answer(session, request, axis)
            refining = base is not None or decoded is not None
            orphaned = sorted({p.label for p in parsed.prompts if correction and p.label not in session.label_ranges})
            self._update_state(session, parsed, base, refining, correction)
            prompts = self._session_prompts(session, request)
            span = _union_range(session.label_ranges)
            signature = (span, stop_rule, str(request.get("scribble_mode") or self.settings.scribble_mode))
            kept = _unchanged_labels(session, signature, {p.label for p in parsed.prompts}, refining)
            ready = _ready_at_request(session.volume, session.label_ranges, prompts)
            result = propagate_volume(
                session.volume,
                [p for p in prompts if p.label not in kept],
                span,
                stop_rule=stop_rule,
                mask_inputs=session.prompt_masks,
            )
            if kept:
                result = result.with_labels_from(session.last_run.result, kept)
            session.last_run = LastPropagation(signature, result)
            session.last_logits = result.logits
            t1 = time.perf_counter()
            frames = result.label_frames()
            if session.base is not None:
                frames = compose_with_base(session.base, frames, self._spans(session))
            label = frames_to_volume(frames, axis)
            out = self._result_3d(session, parsed, reused, result, stop_rule, correction, orphaned, image_path)
            out["session"]["ready_at_request"] = ready
            out["session"]["labels_recomputed"] = sorted(set(result.logits) - set(kept))
            self._push(session, history, label, out, "medsam2_3d")
        self._update_sizes(key)
        t2 = time.perf_counter()
        out["latencies"] = {
            **timings,
            **result.latencies,
            "compose": round(t2 - t1, 4),
            "total": round(time.perf_counter() - t0, 4),
        }
        out["slices_per_second"] = round(result.num_slices * len(result.logits) / max(t2 - t0, 1e-9), 2)
        return label, out, session.image.reference

    def _axis_3d(self, request: dict[str, Any], label_file: LabelFile | None) -> int:
        """The request's axis; for scribbles painted into an uploaded label with no axis named, the axis they
        were painted across."""
        if request.get("axis") not in (None, "") or label_file is None or label_file.source != "upload":
            return parse_axis(request.get("axis"))
        values = read_label_values(label_file.path, self.settings.max_voxels)
        if values.ndim != 3:
            return 2  # not a 3D label: refused with a reason when it is read on the image's grid
        target = self.settings.labels.resolve(_target_label(request))
        return painted_axis(values, label_file, self.settings.labels, target)

    # --- request pieces shared by 2D and 3D -------------------------------------------------------------------

    def _decode(
        self, session: ImageSession, request: dict[str, Any], label_file: LabelFile | None, axis: int
    ) -> DecodedLabel | None:
        """The label file a request starts from (upload or datastore), read on the image's grid."""
        if label_file is None:
            return None
        values = load_label_on(label_file.path, session.image.reference, f"{label_file.source} label")
        target = self.settings.labels.resolve(_target_label(request))
        return decode_label(frames_along_axis(values, axis), label_file, self.settings.labels, target)

    def _last_answer(self, session: ImageSession, request: dict[str, Any], axis: int) -> BaseLabel | None:
        """``refine_from: "last"``: the session's current answer as the base label."""
        if str(request.get("refine_from") or "").strip().lower() != "last":
            return None
        history = session.undo_history(self.settings.undo_levels)
        if history.current.answer is None:
            raise PromptError("refine_from 'last': this session has no answer on this image yet.", status=404)
        return BaseLabel(frames_along_axis(history.current.label(session.image.array.shape), axis), "last answer")

    def _parse(
        self,
        request: dict[str, Any],
        shape: tuple[int, ...],
        decoded: DecodedLabel | None,
        dimension: int,
        axis: int = 2,
    ) -> ParsedRequest:
        """Prompts from the request's JSON or viewer form, plus one per slice with painted scribbles."""
        painted = decoded is not None and decoded.has_scribbles
        sent = any(request.get(k) not in (None, "", []) for k in ("prompts", "foreground", "background"))
        if decoded is not None and not painted and not sent:
            raise PromptError(
                f"The {decoded.source} label holds no scribbles (foreground_scribbles, background_scribbles) and the "
                "request no prompt: paint scribbles on a key slice, or send prompts with the label."
            )
        if sent or not painted:
            parsed = parse_request(request, shape, self.settings.labels, dimension)
        else:  # a scribbles request (Slicer): its ROI bounds the slices to recompute, it is not a box
            parsed = ParsedRequest([], axis, roi_slice_range(request.get("roi"), shape, axis))
        if painted:
            name, value = self.settings.labels.resolve(_target_label(request))
            n_slices, rows, cols = slice_shape(shape, axis)
            empty = np.zeros((n_slices, rows, cols), dtype=bool)
            fg = decoded.foreground if decoded.foreground is not None else empty
            bg = decoded.background if decoded.background is not None else empty
            allowed = parsed.slice_range
            painted_on = painted_prompts(fg, bg, name, value, allowed)
            if dimension == 2:
                painted_on = [p for p in painted_on if p.slice_index == _int_or(request.get("slice"), p.slice_index)]
            parsed.prompts = _merge_same_slice(parsed.prompts + painted_on)
        if not parsed.prompts:
            raise PromptError("The uploaded label holds no scribbles on the slices this request covers.")
        if dimension == 2 and len({p.slice_index for p in parsed.prompts}) > 1:
            raise PromptError("The 2D model segments one slice per request; send 'slice' or scribble on one slice.")
        return parsed

    def _resolve(
        self,
        prompt: KeySlicePrompt,
        base: BaseLabel | None,
        request: dict[str, Any],
        rows: int,
        cols: int,
        previous: torch.Tensor | None = None,
    ) -> KeySlicePrompt:
        """The prompt as SAM2 takes it, refining the base label's mask on its slice, or (a correction made of
        strokes only) the mask the last answer had there (``previous``, low-res logits)."""
        mask = None
        if base is not None:
            mask = base.slice_mask(prompt.label_value, prompt.slice_index)
            mask = mask if mask.any() else None
        if mask is None and previous is not None and not prompt.has_clicks_or_box():
            mask = (upsample_logits(previous[None, None], rows, cols)[0] > 0).cpu().numpy()
        mode = str(request.get("scribble_mode") or self.settings.scribble_mode)
        refining = base is not None or previous is not None
        return resolve_drawn(prompt, mask, mode, rows, cols, refining=refining)

    def _update_state(
        self, session: ImageSession, parsed: ParsedRequest, base: BaseLabel | None, refining: bool, correction: bool
    ) -> None:
        named = {p.label: p.label_value for p in parsed.prompts}
        if refining:  # the base label supersedes the session's earlier prompts: start over from it
            session.restore({**_EMPTY_STATE, "base": base})
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

    def _session_prompts(self, session: ImageSession, request: dict[str, Any]) -> list[KeySlicePrompt]:
        """The session's prompts as SAM2 takes them, plus the base's masks bounding each refined label's span."""
        _, rows, cols = session.volume.frames.shape
        prompts = [
            self._resolve(p, session.base, request, rows, cols, session.prompt_masks.get(key))
            for key, p in session.prompts.items()
        ]
        if session.base is not None:
            for name, (lo, hi) in self._spans_by_name(session).items():
                value = self.settings.labels.by_name[name]
                prompts += boundary_prompts(session.base, name, value, (lo, hi))
        return prompts

    def _spans_by_name(self, session: ImageSession) -> dict[str, tuple[int, int]]:
        n = session.volume.num_slices
        names = {p.label for p in session.prompts.values()}
        return {name: session.label_ranges.get(name) or (0, n - 1) for name in sorted(names)}

    def _spans(self, session: ImageSession) -> dict[int, tuple[int, int]]:
        return {self.settings.labels.by_name[k]: v for k, v in self._spans_by_name(session).items()}

    def _result_3d(self, session, parsed, reused, result, stop_rule, correction, orphaned, image_path) -> dict:
        axis = parsed.axis
        confidence = slice_confidence(result)
        to_check = slices_to_check(result, confidence, count=self.settings.slices_to_check)
        out = self._common_json(session, parsed, reused)
        out["prompts_in_session"] = [p.as_json(axis) for p in session.prompts.values()]
        out["axis"] = AXIS_NAMES[axis]
        out["coverage"] = result.coverage()
        out["correction"] = correction
        out["stop_rule"] = None if stop_rule is None else dataclasses.asdict(stop_rule)
        out["confidence"] = _per_slice_json(confidence)
        out["object_scores"] = _per_slice_json(result.object_scores)
        out["predicted_iou"] = _per_slice_json(result.predicted_iou)
        out["check_slices"] = {name: [p.as_json() for p in picks] for name, picks in to_check.items()}
        out["hint"] = check_hint(to_check)
        if session.base is not None:
            out["refined_from"] = session.base.source
            out["changed_slices"] = {name: list(span) for name, span in self._spans_by_name(session).items()}
        if orphaned:
            warning = (
                f"Correction of {', '.join(orphaned)}: this session holds no earlier prompts for it (it is new, or was "
                "dropped from the server's session cache: --conf max_sessions), so it was propagated from this "
                "request's prompts alone. Send the earlier key slices again with this correction."
            )
            out["warnings"] = [warning]
            out["hint"] = f"{warning} {out['hint']}"
            logger.warning("medsam2_3d on %s: %s", image_path, warning)
        return out

    def _push(self, session: ImageSession, history: UndoHistory, label: np.ndarray, out: dict, what: str) -> None:
        """Record the answer for undo; the answer JSON says what can be undone and redone from here."""
        history.push(Snapshot.of(session.state(), label, dict(out), what))
        out["history"] = history.describe()

    def _replay(
        self, session: ImageSession, history: UndoHistory, step: str, t0: float
    ) -> tuple[np.ndarray, dict[str, Any], Any]:
        """Undo or redo: the session's state and answer as they were, with no encoding or decoding."""
        snapshot = history.undo() if step == "undo" else history.redo()
        session.restore(snapshot.state)
        out = {k: v for k, v in snapshot.answer_json.items() if k not in ("latencies", "history")}
        out.setdefault("label_names", dict(self.settings.labels.by_name))
        out[step] = True
        out["restored"] = snapshot.request
        out["history"] = history.describe()
        label = snapshot.label(session.image.array.shape)
        out["latencies"] = {"total": round(time.perf_counter() - t0, 4)}
        return label, out, session.image.reference


_EMPTY_STATE: dict[str, Any] = {
    "prompts": {},
    "label_ranges": {},
    "last_logits": {},
    "prompt_masks": {},
    "base": None,
    "last_run": None,
}


def history_step(request: dict[str, Any]) -> str | None:
    """ "undo" or "redo" when the request asks for one (PromptError for both or a value that is not a flag)."""
    undo, redo = parse_flag(request.get("undo"), "undo"), parse_flag(request.get("redo"), "redo")
    if undo and redo:
        raise PromptError("Send undo or redo, not both.")
    return "undo" if undo else "redo" if redo else None


def _target_label(request: dict[str, Any]) -> Any:
    """The label a scribbles request refines: Slicer names it ``selected_label_name``; others ``label``."""
    return request.get("selected_label_name") or request.get("label")


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _merge_same_slice(prompts: list[KeySlicePrompt]) -> list[KeySlicePrompt]:
    """One prompt per label and slice: clicks, boxes and strokes given twice for one slice are combined."""
    merged: dict[tuple[str, int], KeySlicePrompt] = {}
    for p in prompts:
        key = (p.label, p.slice_index)
        old = merged.get(key)
        merged[key] = (
            p
            if old is None
            else dataclasses.replace(
                old,
                box=old.box or p.box,
                points=old.points + p.points,
                point_labels=old.point_labels + p.point_labels,
                strokes=merge_strokes(old.strokes, p.strokes),
            )
        )
    return list(merged.values())


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
