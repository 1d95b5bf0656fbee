"""Run ``POST /infer/{model}`` (and, next to a PACS, the datastore routes) off the server's event loop.

MONAI Label 0.8.5 declares that endpoint ``async`` but does all the work synchronously inside it, so one
inference blocks the event loop: every other request (``/info/`` included) waits for it, unbounded and
unseen. Here the same endpoint function of MONAI Label runs in a thread pool of its own, so the app's
admission gate sees concurrent requests and can queue or refuse them, and ``/info/`` answers meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

from lib.server.server_process import in_server

logger = logging.getLogger(__name__)

INFER_PATH = "/infer/{model}"
_EXECUTOR: ThreadPoolExecutor | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None or _EXECUTOR._max_workers < workers:
        _EXECUTOR = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medsam2-infer")
    return _EXECUTOR


def _find_route(router, path: str, seen: set[int] | None = None, method: str = "POST"):
    """(owning router, index, route) of ``method path``: FastAPI versions that copy included routes into the
    app keep it in the app's list; newer ones keep it in the included router (``original_router``)."""
    from fastapi.routing import APIRoute

    seen = seen if seen is not None else set()
    if id(router) in seen:
        return None
    seen.add(id(router))
    for index, route in enumerate(router.routes):
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            return router, index, route
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found = _find_route(inner, path, seen, method)
            if found:
                return found
    return None


def _replace_endpoint(found, endpoint) -> None:
    owner, index, route = found
    prefix = getattr(owner, "prefix", "") or ""
    owner.add_api_route(  # an APIRouter adds its prefix again
        route.path[len(prefix) :] if prefix and route.path.startswith(prefix) else route.path,
        endpoint,
        methods=sorted(route.methods),
        summary=route.summary,
        tags=route.tags,
        responses=route.responses,
        name=route.name,
        include_in_schema=route.include_in_schema,
    )
    owner.routes[index] = owner.routes.pop()  # same place in the routing order and in the API docs
    mark_changed = getattr(owner, "_mark_routes_changed", None)  # FastAPI versions that cache resolved routes
    if mark_changed is not None:
        mark_changed()


# MONAI Label's routes that reach the datastore: each may wait for a PACS, or write a large label file.
DATASTORE_ROUTES = [
    ("GET", "/datastore/"),
    ("PUT", "/datastore/label"),
    ("GET", "/datastore/label"),
    ("HEAD", "/datastore/label"),
    ("GET", "/datastore/image"),
    ("HEAD", "/datastore/image"),
    ("GET", "/datastore/image/info"),
    ("DELETE", "/datastore/label"),
    ("GET", "/datastore/dataset"),
    ("POST", "/activelearning/{strategy}"),
]


def serve_datastore_routes_in_threads(workers: int = 8) -> int:
    """Run MONAI Label's datastore and active-learning handlers (``async`` functions that block on the
    datastore) in threads of their own, so a PACS that is slow to answer holds up its own request, not the
    event loop and with it every other request. Returns the number of routes moved."""
    if not in_server():
        return 0
    from monailabel.app import app as server
    from monailabel.config import settings

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medsam2-datastore")
    moved = 0
    for method, path in DATASTORE_ROUTES:
        found = _find_route(server.router, settings.MONAI_LABEL_API_STR + path, method=method)
        if not found or getattr(found[2].endpoint, "_medsam2_threaded", False):
            continue
        original = found[2].endpoint

        def bind(original):
            @functools.wraps(original)
            async def in_thread(**kwargs):
                work = functools.partial(contextvars.copy_context().run, lambda: asyncio.run(original(**kwargs)))
                return await asyncio.get_running_loop().run_in_executor(pool, work)

            in_thread._medsam2_threaded = True  # type: ignore[attr-defined]
            return in_thread

        _replace_endpoint(found, bind(original))
        moved += 1
    server.openapi_schema = None
    return moved


def unthreaded_datastore_routes() -> list[tuple[str, str]]:
    """The routes of :data:`DATASTORE_ROUTES` that do not run in threads (missing, or not replaced)."""
    from monailabel.app import app as server
    from monailabel.config import settings

    missing = []
    for method, path in DATASTORE_ROUTES:
        found = _find_route(server.router, settings.MONAI_LABEL_API_STR + path, method=method)
        if not found or not getattr(found[2].endpoint, "_medsam2_threaded", False):
            missing.append((method, path))
    return missing


def serve_infer_in_threads(workers: int) -> bool:
    """Replace the ``/infer/{model}`` route of the running MONAI Label server by one that runs MONAI Label's
    handler in ``workers`` threads. Threads beyond the admission limits only refuse, so a few spare ones keep
    refusals immediate. Returns False when not inside the server (e.g. a training subprocess)."""
    if not in_server():
        return False
    from monailabel.app import app as server
    from monailabel.config import settings
    from monailabel.endpoints import infer as infer_endpoints

    found = _find_route(server.router, settings.MONAI_LABEL_API_STR + INFER_PATH)
    if not found:
        logger.warning("No POST %s route found: inference stays on the event loop", INFER_PATH)
        return False
    original = getattr(found[2].endpoint, "__wrapped__", found[2].endpoint)
    pool = _executor(workers)

    @functools.wraps(original)  # FastAPI reads the parameters (form fields, files, auth) from the signature
    async def run_in_thread(**kwargs):
        kwargs.pop("user", None)  # checked by the dependency; not a parameter of run_inference
        call = functools.partial(infer_endpoints.run_inference, **kwargs)
        # the request's context (its request id, for the log lines) goes with it into the thread
        return await asyncio.get_running_loop().run_in_executor(pool, contextvars.copy_context().run, call)

    _replace_endpoint(found, run_in_thread)
    server.openapi_schema = None
    return True
