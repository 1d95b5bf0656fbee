"""Run ``POST /infer/{model}`` off the server's event loop.

MONAI Label 0.8.5 declares that endpoint ``async`` but does all the work synchronously inside it, so one
inference blocks the event loop: every other request (``/info/`` included) waits for it, unbounded and
unseen. Here the same endpoint function of MONAI Label runs in a thread pool of its own, so the app's
admission gate sees concurrent requests and can queue or refuse them, and ``/info/`` answers meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

INFER_PATH = "/infer/{model}"
_EXECUTOR: ThreadPoolExecutor | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None or _EXECUTOR._max_workers < workers:
        _EXECUTOR = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medsam2-infer")
    return _EXECUTOR


def _find_route(router, path: str, seen: set[int] | None = None):
    """(owning router, index, route) of ``POST path``: FastAPI versions that copy included routes into the
    app keep it in the app's list; newer ones keep it in the included router (``original_router``)."""
    from fastapi.routing import APIRoute

    seen = seen if seen is not None else set()
    if id(router) in seen:
        return None
    seen.add(id(router))
    for index, route in enumerate(router.routes):
        if isinstance(route, APIRoute) and route.path == path and "POST" in route.methods:
            return router, index, route
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found = _find_route(inner, path, seen)
            if found:
                return found
    return None


def serve_infer_in_threads(workers: int) -> bool:
    """Replace the ``/infer/{model}`` route of the running MONAI Label server by one that runs MONAI Label's
    handler in ``workers`` threads. Threads beyond the admission limits only refuse, so a few spare ones keep
    refusals immediate. Returns False when not inside the server (e.g. a training subprocess)."""
    try:
        from monailabel.app import app as server
        from monailabel.config import settings
        from monailabel.endpoints import infer as infer_endpoints
    except Exception:
        return False
    found = _find_route(server.router, settings.MONAI_LABEL_API_STR + INFER_PATH)
    if not found:
        logger.warning("No POST %s route found: inference stays on the event loop", INFER_PATH)
        return False
    owner, index, route = found
    original = getattr(route.endpoint, "__wrapped__", route.endpoint)
    pool = _executor(workers)

    @functools.wraps(original)  # FastAPI reads the parameters (form fields, files, auth) from the signature
    async def run_in_thread(**kwargs):
        kwargs.pop("user", None)  # checked by the dependency; not a parameter of run_inference
        call = functools.partial(infer_endpoints.run_inference, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    prefix = getattr(owner, "prefix", "") or ""
    owner.add_api_route(  # an APIRouter adds its prefix again
        route.path[len(prefix) :] if prefix and route.path.startswith(prefix) else route.path,
        run_in_thread,
        methods=sorted(route.methods),
        summary=route.summary,
        tags=route.tags,
        responses=route.responses,
        name=route.name,
    )
    owner.routes[index] = owner.routes.pop()  # same place in the routing order and in the API docs
    mark_changed = getattr(owner, "_mark_routes_changed", None)  # FastAPI versions that cache resolved routes
    if mark_changed is not None:
        mark_changed()
    server.openapi_schema = None
    return True
