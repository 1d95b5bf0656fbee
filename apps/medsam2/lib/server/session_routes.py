"""``POST /medsam2/heartbeat`` (docs/api.md): a viewer with a study open says so every 30 s, so its annotation
sessions outlive ``--conf session_idle_timeout_s`` while the annotator looks without clicking.

Body ``{"image": "<image id>"}`` (optionally ``"client_id"`` or ``"annotation_session"``: only that session) ->
204; 429 with ``Retry-After`` and what to do when the image has no session and the server is at its cap of live
sessions (``--conf max_live_sessions``); 422 for a body it cannot read. With login on it needs any MONAI Label
role, like every route (lib/server/access_control.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import Request, Response

from lib.errors import AppError, Unprocessable
from lib.server.error_handlers import answer
from lib.server.server_process import in_server

logger = logging.getLogger(__name__)

HEARTBEAT = "/medsam2/heartbeat"
Heartbeat = Callable[[str, "str | None"], int]  # (image id, session name or None) -> sessions kept


def read_heartbeat(body: bytes) -> tuple[str, str | None]:
    """(image id, session name or None) from a heartbeat body; :class:`Unprocessable` saying what to send."""
    try:
        data = json.loads(body or b"null")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise Unprocessable('Send a JSON object: {"image": "<image id>"}.')
    image = data.get("image")
    if not isinstance(image, str) or not 0 < len(image) <= 256 or "/" in image or "\\" in image:
        raise Unprocessable("'image' must be the id of the open image (1 to 256 characters, no '/').")
    session = data.get("annotation_session") or data.get("client_id")
    if session is not None and (not isinstance(session, str) or len(session) > 256):
        raise Unprocessable("'client_id' must be text of at most 256 characters.")
    return image, session


def install(heartbeat: Heartbeat) -> bool:
    """Serve the route (idempotent: ``POST /reload`` calls it again). False outside the server."""
    if not in_server():
        return False
    from monailabel.app import app as server

    async def medsam2_heartbeat(request: Request) -> Response:
        """A viewer still has this image open: keep its annotation sessions (docs/api.md)."""
        try:
            image, session = read_heartbeat(await request.body())
            heartbeat(image, session)
        except AppError as e:
            return answer(e)
        return Response(status_code=204)

    server.router.routes[:] = [r for r in server.router.routes if getattr(r, "path", None) != HEARTBEAT]
    server.router.add_api_route(
        HEARTBEAT,
        medsam2_heartbeat,
        methods=["POST"],
        status_code=204,
        tags=["MedSAM2"],
        summary="Keep a viewer's annotation sessions on an open image (every 30 s)",
        response_class=Response,
    )
    server.openapi_schema = None  # described again on the next /openapi.json
    return is_installed()


def is_installed() -> bool:
    from monailabel.app import app as server

    return any(getattr(r, "path", None) == HEARTBEAT for r in server.router.routes)
