"""One handler turns the app's errors (:class:`lib.errors.AppError`) — and MONAI Label's own exceptions, which
it otherwise answers with a 500 — into ``{"detail": ...}`` answers with the error's status and headers."""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from lib.errors import AppError
from lib.server.server_process import in_server

logger = logging.getLogger(__name__)


def answer(error: AppError) -> JSONResponse:
    """The HTTP answer to ``error``."""
    return JSONResponse(status_code=error.status, content={"detail": error.detail}, headers=error.headers or None)


async def app_error(request: Request, exc: AppError) -> JSONResponse:
    return answer(exc)


async def bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    """MONAI Label parses ``params`` and label infos with json.loads: bad JSON is the client's, not a 500."""
    return answer(AppError(f"'params' is not valid JSON: {exc.msg}.", 400))


async def out_of_memory(request: Request, exc: MemoryError) -> JSONResponse:
    logger.error("Out of memory serving %s %s", request.method, request.url.path)
    return answer(AppError("The server ran out of memory; retry later.", 503, {"Retry-After": "30"}))


def monailabel_error(exc: Exception) -> AppError:
    """MONAI Label's exception as the app's: what was not found is a 404, invalid input a 422."""
    from monailabel.interfaces.exception import (
        ImageNotFoundException,
        LabelNotFoundException,
        MONAILabelError,
    )

    message = str(getattr(exc, "msg", "") or exc)
    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
        return AppError(f"{message}: see GET /datastore/?output=all for the ids this server has.", 404)
    if getattr(exc, "error", None) == MONAILabelError.INVALID_INPUT:
        return AppError(message, 422)
    return AppError(f"MONAI Label could not serve this request: {message}", 500)


async def monailabel_exception(request: Request, exc: Exception) -> JSONResponse:
    return answer(monailabel_error(exc))


def handlers() -> dict[type[BaseException], object]:
    from monailabel.interfaces.exception import MONAILabelException

    return {
        AppError: app_error,
        json.JSONDecodeError: bad_json,
        MemoryError: out_of_memory,
        MONAILabelException: monailabel_exception,
    }


def install() -> bool:
    """Add the handlers to the running server (idempotent); False outside the server."""
    if not in_server():
        return False
    from monailabel.app import app as server

    wanted = handlers()
    for exc_class, handler in wanted.items():
        if server.exception_handlers.get(exc_class) is not handler:
            server.add_exception_handler(exc_class, handler)
            server.middleware_stack = None  # rebuilt with the handler on the next request
    return all(server.exception_handlers.get(c) is h for c, h in wanted.items())
