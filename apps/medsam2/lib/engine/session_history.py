"""Undo and redo of an annotation session: snapshots of its prompts and of the answer each request gave."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lib.errors import PromptError


@dataclass(frozen=True)
class Snapshot:
    """A session's state after one request: what the next request builds on, and the answer it gave (a label
    volume, kept compressed: label maps compress a hundredfold)."""

    state: dict[str, Any]
    answer: bytes | None = None
    answer_shape: tuple[int, ...] = ()
    answer_json: dict[str, Any] = field(default_factory=dict)
    request: str = ""
    answer_id: str = ""  # names this state to a client (docs/api.md)

    @classmethod
    def of(
        cls, state: dict[str, Any], label: np.ndarray | None, answer_json: dict, request: str, answer_id: str = ""
    ) -> Snapshot:
        packed = None if label is None else zlib.compress(np.ascontiguousarray(label, dtype=np.uint8).tobytes(), 1)
        return cls(state, packed, () if label is None else tuple(label.shape), answer_json, request, answer_id)

    def label(self, shape: tuple[int, ...]) -> np.ndarray:
        """The answer's label volume (all zero for the state before the first request)."""
        if self.answer is None:
            return np.zeros(shape, dtype=np.uint8)
        return np.frombuffer(zlib.decompress(self.answer), dtype=np.uint8).reshape(self.answer_shape).copy()

    def nbytes(self) -> int:
        return len(self.answer or b"")


class UndoHistory:
    """A line of snapshots with a cursor; a new request drops the snapshots ahead of the cursor (no redo after a
    new edit, as in every editor). Keeps ``levels`` undo steps."""

    def __init__(self, initial: Snapshot, levels: int = 16):
        if levels < 1:
            raise ValueError("undo levels must be at least 1")
        self.levels = levels
        self.snapshots = [initial]
        self.position = 0

    @property
    def current(self) -> Snapshot:
        return self.snapshots[self.position]

    def push(self, snapshot: Snapshot) -> None:
        del self.snapshots[self.position + 1 :]
        self.snapshots.append(snapshot)
        if len(self.snapshots) > self.levels + 1:
            del self.snapshots[0]
        self.position = len(self.snapshots) - 1

    def undo(self) -> Snapshot:
        if self.position == 0:
            raise PromptError(
                "Nothing to undo: this session has no earlier request on this image (or the earlier ones are past "
                f"the {self.levels} undo levels the server keeps)."
            )
        self.position -= 1
        return self.current

    def redo(self) -> Snapshot:
        if self.position == len(self.snapshots) - 1:
            raise PromptError("Nothing to redo: no request was undone since the last edit in this session.")
        self.position += 1
        return self.current

    def find(self, answer_id: str) -> Snapshot | None:
        """The snapshot an answer_id names, while the history holds it."""
        return next((s for s in self.snapshots if s.answer_id and s.answer_id == answer_id), None)

    def describe(self) -> dict[str, Any]:
        return {
            "can_undo": self.position > 0,
            "can_redo": self.position < len(self.snapshots) - 1,
            "undo_levels": self.position,
            "redo_levels": len(self.snapshots) - 1 - self.position,
        }

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.snapshots)
