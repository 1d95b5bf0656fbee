"""Undo and redo of an annotator's session: each answer is recorded in the session's history
(:mod:`lib.engine.session_history`), and an undo or redo request restores a recorded state and answers it again,
with no encoding or decoding."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lib.engine.image_sessions import ImageSession
from lib.engine.request import SegmentRequest
from lib.engine.session_history import Snapshot, UndoHistory


def record(session: ImageSession, history: UndoHistory, label: np.ndarray, out: dict[str, Any], what: str) -> None:
    """Record the answer for undo; the answer JSON says what can be undone and redone from here."""
    history.push(Snapshot.of(session.state(), label, dict(out), what))
    out["history"] = history.describe()


def replay(
    session: ImageSession, history: UndoHistory, request: SegmentRequest, t0: float
) -> tuple[np.ndarray, dict[str, Any], Any]:
    """Undo or redo: the session's state and answer as they were. Returns (label, answer JSON, reference image)."""
    step = request.history_step
    snapshot = history.undo() if step == "undo" else history.redo()
    session.restore(snapshot.state)
    out = {k: v for k, v in snapshot.answer_json.items() if k not in ("latencies", "history")}
    out.setdefault("label_names", dict(request.labels.by_name))
    out[step] = True
    out["restored"] = snapshot.request
    out["history"] = history.describe()
    label = snapshot.label(session.image.array.shape)
    out["latencies"] = {"total": round(time.perf_counter() - t0, 4)}
    return label, out, session.image.reference
