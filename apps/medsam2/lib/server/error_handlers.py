"""The server's answers to the app's errors: exception handlers added to MONAI Label's FastAPI app."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from lib.server.patches import in_server
from lib.storage.pacs_datastore import PacsUnavailable, PacsUploadFailed


async def bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    """MONAI Label parses ``params`` with json.loads and answers 500 on bad JSON; answer 400 instead."""
    return JSONResponse(status_code=400, content={"detail": f"'params' is not valid JSON: {exc.msg}."})


async def pacs_unavailable(request: Request, exc: PacsUnavailable) -> JSONResponse:
    return JSONResponse(
        status_code=exc.status, content={"detail": str(exc)}, headers={"Retry-After": str(exc.retry_after_s)}
    )


async def pacs_upload_failed(request: Request, exc: PacsUploadFailed) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"detail": str(exc)})


HANDLERS = {json.JSONDecodeError: bad_json, PacsUnavailable: pacs_unavailable, PacsUploadFailed: pacs_upload_failed}


def install() -> bool:
    """Add the handlers to the running server (idempotent); False outside the server."""
    if not in_server():
        return False
    from monailabel.app import app as server

    for exc_class, handler in HANDLERS.items():
        if server.exception_handlers.get(exc_class) is not handler:
            server.add_exception_handler(exc_class, handler)
            server.middleware_stack = None  # rebuilt with the handler on the next request
    return all(server.exception_handlers.get(c) is h for c, h in HANDLERS.items())
