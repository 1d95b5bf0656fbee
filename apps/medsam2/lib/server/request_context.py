"""The request id of the HTTP request being served, for log lines and the answer's ``X-Request-ID`` header.

A client (or nginx in front of the replicas) may send ``X-Request-ID``; a well-formed one is kept, so one id
follows a request through the load balancer and the replica. Otherwise the server makes one. The id lives in a
context variable: inference threads started for the request (Starlette's thread pool copies the context) log
it too.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "x-request-id"
_WELL_FORMED = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")
_current: ContextVar[str] = ContextVar("medsam2_request_id", default="")


def request_id_from(header_value: str | None) -> str:
    """The client's id when well formed (8 to 64 letters, digits, ``. _ : -``), else a new random one."""
    if header_value and _WELL_FORMED.match(header_value):
        return header_value
    return uuid.uuid4().hex


def set_request_id(request_id: str) -> object:
    """Make ``request_id`` current; returns a token for :func:`reset_request_id`."""
    return _current.set(request_id)


def reset_request_id(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def current_request_id() -> str:
    """The id of the request this code runs for ('' outside a request)."""
    return _current.get()
