"""Undo and redo of an annotator's session: each answer is recorded in the session's history
(:mod:`lib.engine.session_history`) under its ``answer_id``, and an undo or redo request restores a recorded state
and answers it again, with no encoding or decoding. A request with ``changed_since`` names the state its client
holds; the answer then says which box changed since (:mod:`lib.engine.changed_region`, docs/api.md)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lib.engine.changed_region import changed_region
from lib.engine.image_sessions import ImageSession
from lib.engine.request import EMPTY_STATE, SegmentRequest
from lib.engine.session_history import Snapshot, UndoHistory
from lib.errors import StateNotHeld

_EMPTY = Snapshot({}, None)  # the all-zero label a client holds before its first answer


def held_state(history: UndoHistory, request: SegmentRequest) -> Snapshot | None:
    """The state ``changed_since`` names (None without it); :class:`StateNotHeld` (409) when the session does not
    hold it. Looked up before the request changes anything, so a client told 409 can send it again as it was."""
    if request.changed_since is None:
        return None
    if request.changed_since == EMPTY_STATE:
        return _EMPTY
    held = history.find(request.changed_since)
    if held is None:
        raise StateNotHeld(request.changed_since)
    return held


def record(
    session: ImageSession,
    history: UndoHistory,
    label: np.ndarray,
    out: dict[str, Any],
    request: SegmentRequest,
    since: Snapshot | None,
) -> None:
    """Record the answer for undo under a new ``answer_id``; the answer JSON says what can be undone and redone
    from here, and (with ``since``) which box changed since the state its client holds."""
    out["answer_id"] = session.next_answer_id()
    what = "medsam2_2d" if request.dimension == 2 else "medsam2_3d"
    history.push(Snapshot.of(session.state(), label, dict(out), what, out["answer_id"]))
    out["history"] = history.describe()
    _add_changed_region(out, label, since, request)


def replay(
    session: ImageSession, history: UndoHistory, request: SegmentRequest, since: Snapshot | None, t0: float
) -> tuple[np.ndarray, dict[str, Any], Any]:
    """Undo or redo: the session's state and answer as they were. Returns (label, answer JSON, reference image)."""
    step = request.history_step
    snapshot = history.undo() if step == "undo" else history.redo()
    session.restore(snapshot.state)
    out = {k: v for k, v in snapshot.answer_json.items() if k not in ("latencies", "history")}
    out.setdefault("label_names", dict(request.labels.by_name))
    out[step] = True
    out["restored"] = snapshot.request
    out["answer_id"] = snapshot.answer_id
    out["history"] = history.describe()
    label = snapshot.label(session.image.array.shape)
    _add_changed_region(out, label, since, request)
    out["latencies"] = {"total": round(time.perf_counter() - t0, 4)}
    return label, out, session.image.reference


def _add_changed_region(
    out: dict[str, Any], label: np.ndarray, since: Snapshot | None, request: SegmentRequest
) -> None:
    """``changed_region``: the box of ``label`` that differs from the state the client holds (``since``)."""
    if since is not None and request.changed_since is not None:
        out["changed_region"] = changed_region(label, since.label(label.shape), request.changed_since).as_json()
