"""Saved labels and label names per image (docs/api.md), as routes of MONAI Label's server:

- ``GET /medsam2/labels/{image_id}``: the image's label names and every label saved for it, newest first;
- ``POST /medsam2/labels/{image_id}/names`` with ``{"name": "liver"}``: keep a name for the image (on disk, for
  every client), answered like the GET; 422 for a name a DICOM SEG or a PACS refuses.

The answers come from the datastore (:mod:`lib.storage.image_labels`); both run in a thread (a PACS may be slow).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lib.errors import Unprocessable
from lib.server.server_process import in_server
from lib.storage.image_labels import add_name, image_labels

LABELS_PATH = "/medsam2/labels/{image_id}"
NAMES_PATH = "/medsam2/labels/{image_id}/names"

_datastore: Callable[[], Any] | None = None


async def _get_labels(request: Any) -> Any:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    image_id = request.path_params["image_id"]
    return JSONResponse(await run_in_threadpool(image_labels, _datastore(), image_id))


async def _post_name(request: Any) -> Any:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    body = await request.body()
    try:
        name = json.loads(body or b"null")
    except ValueError:
        raise Unprocessable('Send the name as JSON: {"name": "liver"}.') from None
    name = name.get("name") if isinstance(name, dict) else None
    answer = await run_in_threadpool(add_name, _datastore(), request.path_params["image_id"], name)
    return JSONResponse(answer)


def install(datastore: Callable[[], Any]) -> bool:
    """Serve the two routes (idempotent: ``POST /reload`` calls it again). False outside the server."""
    global _datastore
    _datastore = datastore
    if not in_server():
        return False
    from monailabel.app import app as server
    from starlette.routing import Route

    ours = {(LABELS_PATH, "GET"): _get_labels, (NAMES_PATH, "POST"): _post_name}
    paths = {path for path, _ in ours}
    server.router.routes[:] = [r for r in server.router.routes if getattr(r, "path", None) not in paths]
    for (path, method), endpoint in ours.items():
        server.router.routes.append(Route(path, endpoint, methods=[method], include_in_schema=False))
    return is_installed()


def is_installed() -> bool:
    """Both routes are served."""
    from monailabel.app import app as server

    return {LABELS_PATH, NAMES_PATH} <= {getattr(r, "path", None) for r in server.router.routes}
