"""A volume prepared for SAM2 (uint8 frames along one axis) with its lazily computed, cached slice
features, and an LRU cache of such sessions bounded in count and in bytes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lib.engine import sam2_api
from lib.engine.precision import autocast_for
from lib.engine.preprocessing import frames_to_model_input


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes held by these tensors (for the session cache's accounting)."""
    return int(sum(t.numel() * t.element_size() for t in tensors))


def frames_along_axis(volume_u8_kji: np.ndarray, axis: int) -> np.ndarray:
    """(k, j, i) uint8 volume -> frames (n, rows, cols) cut along IJK ``axis`` (a view when possible)."""
    if axis == 2:
        return volume_u8_kji
    if axis == 1:
        return np.ascontiguousarray(volume_u8_kji.transpose(1, 0, 2))
    return np.ascontiguousarray(volume_u8_kji.transpose(2, 0, 1))


def frames_to_volume(frames: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`frames_along_axis`."""
    if axis == 2:
        return frames
    if axis == 1:
        return np.ascontiguousarray(frames.transpose(1, 0, 2))
    return np.ascontiguousarray(frames.transpose(1, 2, 0))


@dataclass
class SliceFeatures:
    """Backbone features of a batch of slices in the layout ``SAM2Base.track_step`` takes."""

    vision_feats: list[torch.Tensor]  # per level (HW, B, C)
    vision_pos_embeds: list[torch.Tensor]
    feat_sizes: list[tuple[int, int]]


class VolumeSession:
    """One image's frames along an axis, its encoded slices, and the prompts given so far.

    Thread safety: callers hold ``lock`` while encoding or propagating.
    """

    def __init__(
        self,
        frames: np.ndarray,
        model: torch.nn.Module,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype | None = None,
        feature_dtype: torch.dtype = torch.float32,
        encode_batch: int = 8,
    ):
        if frames.dtype != np.uint8 or frames.ndim != 3:
            raise ValueError("frames must be a uint8 array (n, rows, cols)")
        self.frames = frames
        self.model = model
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.feature_dtype = feature_dtype
        self.encode_batch = max(1, int(encode_batch))
        self.lock = threading.RLock()
        self._features: dict[int, list[torch.Tensor]] = {}
        self._pos_enc: list[torch.Tensor] | None = None
        self._feat_sizes: list[tuple[int, int]] | None = None
        self.slices_encoded = 0
        self.slices_encoded_ahead = 0  # by the background encoder (lib.engine.encode_ahead)

    @property
    def num_slices(self) -> int:
        return int(self.frames.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    def nbytes(self) -> int:
        """Bytes held: frames plus cached features."""
        # a snapshot: the cache may measure a session while a request on it is encoding more slices
        feats = sum(t.element_size() * t.nelement() for ts in list(self._features.values()) for t in ts)
        return int(self.frames.nbytes) + feats

    def is_encoded(self, index: int) -> bool:
        return index in self._features

    def encoded_count(self, indices: Sequence[int] | None = None) -> int:
        """How many of ``indices`` (default: all slices) are encoded."""
        if indices is None:
            return len(self._features)
        return sum(int(i) in self._features for i in indices)

    def bytes_per_slice(self) -> int:
        """Feature bytes of one encoded slice (0 before the first is encoded)."""
        first = next(iter(list(self._features.values())), None)
        return int(sum(t.element_size() * t.nelement() for t in first)) if first else 0

    @torch.inference_mode()
    def encode(self, indices: Sequence[int]) -> None:
        """Run the image encoder on the slices not cached yet, in batches."""
        todo = sorted({int(i) for i in indices if int(i) not in self._features})
        for start in range(0, len(todo), self.encode_batch):
            chunk = todo[start : start + self.encode_batch]
            images = frames_to_model_input(self.frames[chunk], self.image_size, self.device)
            with autocast_for(self.device, self.compute_dtype):
                backbone_out = self.model.forward_image(images)
            _, _, pos, sizes = sam2_api.prepare_backbone_features(self.model, backbone_out)
            levels = backbone_out["backbone_fpn"][-self.model.num_feature_levels :]
            if self._pos_enc is None:
                self._pos_enc = [p[:1].to(self.feature_dtype) for p in backbone_out["vision_pos_enc"][-len(levels) :]]
                self._feat_sizes = sizes
            for b, index in enumerate(chunk):
                self._features[index] = [lvl[b].to(self.feature_dtype) for lvl in levels]
            self.slices_encoded += len(chunk)

    def features(self, indices: Sequence[int], dtype: torch.dtype = torch.float32, window=None) -> SliceFeatures:
        """Features of the given slices stacked as one batch (encoding any missing ones first); with a
        :class:`lib.engine.roi.Window`, every level and its positional encoding cut to that window."""
        self.encode(indices)
        assert self._pos_enc is not None and self._feat_sizes is not None
        batch = len(indices)
        feats = []
        for level in range(len(self._pos_enc)):
            stacked = torch.stack([_cut(self._features[int(i)][level], window) for i in indices]).to(dtype)
            feats.append(stacked.flatten(2).permute(2, 0, 1))
        pos = [_cut(p, window).to(dtype).expand(batch, -1, -1, -1).flatten(2).permute(2, 0, 1) for p in self._pos_enc]
        return SliceFeatures(feats, pos, self.feat_sizes(window))

    def feat_sizes(self, window=None) -> list[tuple[int, int]]:
        """(H, W) of each feature level, of the whole frame or of a window."""
        assert self._feat_sizes is not None
        if window is None:
            return list(self._feat_sizes)
        grid = self._feat_sizes[-1][0]
        return [(h * window.height // grid, w * window.width // grid) for h, w in self._feat_sizes]

    def gather(self, indices: Sequence[int], out: list[torch.Tensor], window=None) -> None:
        """Stack the cached (B, C, H, W) features of already-encoded slices into preallocated buffers."""
        for level, buf in enumerate(out):
            torch.stack([_cut(self._features[int(i)][level], window) for i in indices], out=buf)

    def stacked(self, indices: Sequence[int], window=None) -> list[torch.Tensor]:
        """The cached features of encoded slices as new (B, C, H, W) tensors, one per level."""
        levels = range(len(self._pos_enc or []))
        return [torch.stack([_cut(self._features[int(i)][lv], window) for i in indices]) for lv in levels]


def _cut(x: torch.Tensor, window) -> torch.Tensor:
    return x if window is None else window.crop(x)


@dataclass
class _Entry:
    session: Any  # anything with nbytes()
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)  # the last request (or heartbeat) that used it


class SessionCache:
    """LRU cache of sessions (objects with ``nbytes()``) keyed by (image, user, ...), bounded in count and bytes."""

    def __init__(
        self,
        max_sessions: int = 4,
        max_bytes: int = 8 << 30,
        on_evict: Callable[[Hashable, Any], None] | None = None,
    ):
        self.on_evict = on_evict  # called (without the cache's lock) for each entry dropped for room
        self.max_sessions = max(1, int(max_sessions))
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self.evictions = 0
        self.peak_bytes = 0  # the most the cache held after an insert or re-measure (and its evictions)

    def get_or_create(self, key: Hashable, factory: Callable[[], Any]) -> tuple[Any, bool]:
        """Return (session, created). Only one thread builds a given key; others wait for it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.last_used = time.monotonic()
                return entry.session, False
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    entry.last_used = time.monotonic()
                    return entry.session, False
            session = factory()
            with self._lock:
                self._entries[key] = _Entry(session, session.nbytes())
                self._key_locks.pop(key, None)
                dropped = self._evict(keep=key)
            self._notify(dropped)
            return session, True

    def update_size(self, key: Hashable) -> None:
        """Re-measure a session after it grew (more slices encoded) and evict others if over the cap."""
        dropped = []
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.nbytes = entry.session.nbytes()
                entry.last_used = time.monotonic()  # the end of a request counts as a use
                dropped = self._evict(keep=key)
        self._notify(dropped)

    def touch(self, condition: Callable[[Hashable, Any], bool]) -> list[Hashable]:
        """Mark the entries for which ``condition(key, session)`` holds as used now (a heartbeat); their keys."""
        now = time.monotonic()
        with self._lock:
            keys = [k for k, e in self._entries.items() if condition(k, e.session)]
            for key in keys:
                self._entries[key].last_used = now
        return keys

    def idle_for(self) -> dict[Hashable, float]:
        """Seconds since each entry was last used."""
        now = time.monotonic()
        with self._lock:
            return {k: now - e.last_used for k, e in self._entries.items()}

    def drop_idle(self, idle_s: float, keep: Callable[[Hashable], bool] = lambda key: False) -> list[tuple]:
        """Drop the entries unused for ``idle_s`` seconds or more (except where ``keep(key)``); (key, session) of
        each, after ``on_evict`` was told (not counted as evictions)."""
        limit = time.monotonic() - idle_s
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.last_used <= limit and not keep(k)]
            dropped = [(k, self._entries.pop(k).session) for k in keys]
        self._notify(dropped)
        return dropped

    def drop_where(self, condition: Callable[[Hashable, Any], bool]) -> int:
        """Drop the entries for which ``condition(key, session)`` holds (not counted as evictions)."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if condition(k, e.session)]
            for key in keys:
                del self._entries[key]
        return len(keys)

    def _notify(self, dropped: list[tuple[Hashable, Any]]) -> None:
        if self.on_evict is not None:
            for key, session in dropped:
                self.on_evict(key, session)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, int]:
        """Sessions and bytes held now, the caps, the peak held and the evictions so far (for ``/info``)."""
        with self._lock:
            return {
                "sessions": len(self._entries),
                "bytes": sum(e.nbytes for e in self._entries.values()),
                "max_sessions": self.max_sessions,
                "max_bytes": self.max_bytes,
                "peak_bytes": self.peak_bytes,
                "evictions": self.evictions,
            }

    def _evict(self, keep: Hashable) -> list[tuple[Hashable, Any]]:
        def over() -> bool:
            total = sum(e.nbytes for e in self._entries.values())
            return len(self._entries) > self.max_sessions or total > self.max_bytes

        dropped = []
        for key in list(self._entries):
            if not over():
                break
            if key != keep:
                dropped.append((key, self._entries.pop(key).session))
                self.evictions += 1
        self.peak_bytes = max(self.peak_bytes, sum(e.nbytes for e in self._entries.values()))
        return dropped
