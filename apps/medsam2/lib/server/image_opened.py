"""Tell the app which image a viewer has just opened, so that it can encode it before the first click.

3D Slicer downloads the image it opens (``GET /datastore/image?image=<id>``); OHIF reads the series through the
app's DICOMweb proxy (``GET /proxy/dicom/...series/<SeriesInstanceUID>/...``). An ASGI middleware watches for
those requests and, once one has been answered 200, calls the app's callback with the image id; the callback
must return at once (the app queues the work, :mod:`lib.engine.encode_ahead`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from lib.server.server_process import in_server

logger = logging.getLogger(__name__)

SERIES_IN_PATH = re.compile(r"/series/([0-9.]{1,64})(?:/|$)")
Callback = Callable[[str, str], None]  # (image id, what opened it)
_callback: Callback | None = None


def opened_image(path: str, query_string: bytes) -> tuple[str, str] | None:
    """(image id, source) when a GET of ``path`` opens an image in a viewer, else None."""
    if path.rstrip("/") == "/datastore/image":
        query = parse_qs(query_string.decode("latin-1"))
        image = (query.get("image") or [""])[0]
        check_only = (query.get("check_only") or ["false"])[0].strip().lower() in ("1", "true", "yes")
        return (image, "image download") if image and not check_only else None
    if path.startswith("/proxy/dicom/"):
        found = SERIES_IN_PATH.search(path)
        return (found.group(1), "dicomweb") if found else None
    return None


class ImageOpenedMiddleware:
    """Calls the registered callback after a viewer's image download or series read was answered 200."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        opened = None
        if scope["type"] == "http" and scope.get("method") == "GET" and _callback is not None:
            opened = opened_image(scope.get("path", ""), scope.get("query_string", b""))
        if opened is None:
            return await self.app(scope, receive, send)

        async def watch(message):
            if message["type"] == "http.response.start" and message.get("status") == 200:
                _notify(*opened)
            await send(message)

        await self.app(scope, receive, watch)


def _notify(image_id: str, source: str) -> None:
    try:
        if _callback is not None:
            _callback(image_id, source)
    except Exception:  # never fail the viewer's request because of a background optimisation
        logger.exception("Image-opened callback failed for %s", image_id)


def install(callback: Callback) -> bool:
    """Register the callback and add the middleware (idempotent: ``POST /reload`` calls it again). False outside
    the server."""
    global _callback
    _callback = callback
    if not in_server():
        return False
    from monailabel.app import app as server
    from starlette.middleware import Middleware

    server.user_middleware = [m for m in server.user_middleware if not _is_ours(m.cls)]
    server.user_middleware.append(Middleware(ImageOpenedMiddleware))  # innermost: sees the route's own answer
    server.middleware_stack = None  # rebuilt on the next request
    return is_installed()


def is_installed() -> bool:
    from monailabel.app import app as server

    return _callback is not None and any(_is_ours(m.cls) for m in server.user_middleware)


def _is_ours(cls: Any) -> bool:
    return (
        getattr(cls, "__qualname__", None) == ImageOpenedMiddleware.__qualname__
        and getattr(cls, "__module__", None) == ImageOpenedMiddleware.__module__
    )
