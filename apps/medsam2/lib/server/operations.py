"""What hospital IT watches: ``/metrics`` (Prometheus text format), ``/health/live`` and ``/health/ready``, a
request id and the replica's name on every answer, and one structured (JSON) log line per request.

The app hands over an :class:`OperationsSource` (its name, a status snapshot, its readiness); this module turns
them into metrics at scrape time and serves the routes. Request counts and latencies are recorded by an ASGI
middleware placed outermost, so refused requests (401, 503, 4xx of the request guard) are counted too.

Metric names, labels and the readiness rule are listed in docs/operations.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from lib.server.request_context import REQUEST_ID_HEADER, request_id_from, reset_request_id, set_request_id
from lib.server.server_process import in_server

logger = logging.getLogger(__name__)
access_log = logging.getLogger("medsam2.access")

SERVED_BY_HEADER = "x-served-by"
HEALTH_LIVE, HEALTH_READY, METRICS = "/health/live", "/health/ready", "/metrics"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter(
    "medsam2_requests",
    "HTTP requests answered, by route template, task (the model of /infer and /train), method and status",
    ["route", "task", "method", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "medsam2_request_seconds",
    "Seconds from a request's arrival to the end of its answer, by route template, task and status",
    ["route", "task", "status"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)


@dataclass(frozen=True)
class OperationsSource:
    """What the app tells this module: its replica name, a status snapshot (see :class:`AppStatusCollector`
    for the keys) and why it is not ready (empty: ready)."""

    replica: str
    status: Callable[[], dict[str, Any]]
    not_ready: Callable[[], list[str]]


_source: OperationsSource | None = None


def _gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    if value is not None:
        family.add_metric(list((labels or {}).values()), float(value))
    return family


class AppStatusCollector(Collector):
    """Gauges read from the app's status at scrape time.

    Status keys: ``admission`` (:meth:`AdmissionGate.snapshot`), ``session_cache`` ({model: cache stats}),
    ``checkpoints`` ({model: {name, licence, version}}), ``training`` ({running, status, last_dice, holder}),
    ``pacs_labels_not_sent`` (int or None for a local datastore)."""

    def collect(self) -> Iterator[Any]:
        if _source is None:
            return
        status = _source.status()
        yield InfoMetricFamily("medsam2_replica", "This server process", value={"replica": _source.replica})
        yield _gauge("medsam2_ready", "1 when /health/ready answers 200", 0.0 if _source.not_ready() else 1.0)
        yield from _admission_metrics(status.get("admission", {}))
        yield from _cache_metrics(status.get("session_cache", {}))
        yield from _checkpoint_metrics(status.get("checkpoints", {}))
        yield from _training_metrics(status.get("training", {}))
        unsent = status.get("pacs_labels_not_sent")
        yield _gauge("medsam2_pacs_labels_not_sent", "Final labels whose DICOM SEG is not yet in the PACS", unsent)


def _admission_metrics(admission: dict[str, Any]) -> Iterator[Any]:
    yield _gauge("medsam2_infer_running", "Inference requests running now", admission.get("running"))
    yield _gauge("medsam2_infer_queued", "Inference requests waiting for a slot (queue depth)", admission.get("queued"))
    refused = CounterMetricFamily("medsam2_infer_refused", "Inference requests refused with 503", labels=["reason"])
    refused.add_metric(["queue_full"], float(admission.get("refused_queue_full", 0)))
    refused.add_metric(["queue_timeout"], float(admission.get("refused_timeout", 0)))
    yield refused
    admitted = CounterMetricFamily("medsam2_infer_admitted", "Inference requests given a slot")
    admitted.add_metric([], float(admission.get("admitted", 0)))
    yield admitted


def _cache_metrics(caches: dict[str, dict[str, Any]]) -> Iterator[Any]:
    sessions = GaugeMetricFamily("medsam2_session_cache_entries", "Images held encoded", labels=["model"])
    held = GaugeMetricFamily("medsam2_session_cache_bytes", "Bytes held by the session cache", labels=["model"])
    evicted = CounterMetricFamily("medsam2_session_cache_evictions", "Sessions dropped for room", labels=["model"])
    for model, stats in sorted(caches.items()):
        sessions.add_metric([model], float(stats.get("sessions", 0)))
        held.add_metric([model], float(stats.get("bytes", 0)))
        evicted.add_metric([model], float(stats.get("evictions", 0)))
    yield from (sessions, held, evicted)


def _checkpoint_metrics(checkpoints: dict[str, dict[str, Any]]) -> Iterator[Any]:
    info = InfoMetricFamily("medsam2_checkpoint", "The weights each model serves", labels=["model"])
    version = GaugeMetricFamily(
        "medsam2_checkpoint_loads", "How many times the model was (re)loaded: grows with each publish", labels=["model"]
    )
    for model, c in sorted(checkpoints.items()):
        info.add_metric([model], {"name": str(c.get("name")), "licence": str(c.get("licence"))})
        version.add_metric([model], float(c.get("version", 0)))
    yield from (info, version)


def _training_metrics(training: dict[str, Any]) -> Iterator[Any]:
    yield _gauge(
        "medsam2_training_running", "1 while a training run holds the lock (any replica)", training.get("running")
    )
    yield _gauge(
        "medsam2_training_last_dice", "Best validation Dice of the last training run", training.get("last_dice")
    )
    yield InfoMetricFamily(
        "medsam2_training",
        "State of the last training run and who holds the training lock",
        value={"status": str(training.get("status", "")), "holder": str(training.get("holder") or "")},
    )


REGISTRY.register(AppStatusCollector())


def _route_of(scope: dict[str, Any]) -> str:
    """The matched route's template (``/infer/{model}``), never the raw path: bounded label values."""
    from starlette.routing import Match

    route = scope.get("route")
    if route is None:  # the router sets it on its own copy of the scope
        app = scope.get("app")
        routes = getattr(getattr(app, "router", None), "routes", [])
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


class OperationsMiddleware:
    """Outermost ASGI middleware: request id in and out, ``X-Served-By``, metrics, one JSON log line."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        request_id = request_id_from(headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1"))
        token = set_request_id(request_id)
        replica = _source.replica if _source else ""
        status, start, recorded = 500, time.perf_counter(), False

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [
                    (REQUEST_ID_HEADER.encode(), request_id.encode()),
                    (SERVED_BY_HEADER.encode(), replica.encode()),
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # counted before the client has the whole answer: a scrape right after it sees this request
                _record(scope, status, time.perf_counter() - start, request_id, replica)
                recorded = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if not recorded:
                _record(scope, status, time.perf_counter() - start, request_id, replica)
            reset_request_id(token)


def _record(scope: dict[str, Any], status: int, seconds: float, request_id: str, replica: str) -> None:
    route = _route_of(scope)
    task = str((scope.get("path_params") or {}).get("model", ""))[:64]
    method = scope.get("method", "")
    REQUESTS.labels(route, task, method, str(status)).inc()
    LATENCY.labels(route, task, str(status)).observe(seconds)
    line = {"event": "request", "request_id": request_id, "replica": replica, "method": method, "route": route}
    line.update(task=task, status=status, seconds=round(seconds, 4))
    access_log.info(json.dumps(line))


async def _metrics(request: Any) -> Any:
    from starlette.responses import Response

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def _live(request: Any) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"status": "alive", "replica": _source.replica if _source else ""})


def _ready_answer() -> tuple[int, dict[str, Any]]:
    reasons = _source.not_ready() if _source else ["the app has not started"]
    replica = _source.replica if _source else ""
    if reasons:
        return 503, {"status": "not ready", "replica": replica, "reasons": reasons}
    return 200, {"status": "ready", "replica": replica}


async def _ready(request: Any) -> Any:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    code, body = await run_in_threadpool(_ready_answer)  # the PACS check may wait for its timeout
    return JSONResponse(body, status_code=code)


def install(source: OperationsSource) -> bool:
    """Serve the routes and wrap the server in the middleware (idempotent: ``POST /reload`` calls it again with
    the new app). False outside the server."""
    global _source
    _source = source
    if not in_server():
        return False
    from monailabel.app import app as server
    from starlette.middleware import Middleware
    from starlette.routing import Route

    ours = {METRICS: _metrics, HEALTH_LIVE: _live, HEALTH_READY: _ready}
    server.router.routes[:] = [r for r in server.router.routes if getattr(r, "path", None) not in ours]
    server.router.routes.extend(Route(p, e, methods=["GET"], include_in_schema=False) for p, e in ours.items())
    server.user_middleware = [m for m in server.user_middleware if not _is_ours(m.cls)]
    server.user_middleware.insert(0, Middleware(OperationsMiddleware))  # outermost: sees every answer
    server.middleware_stack = None  # rebuilt on the next request
    return is_installed()


def is_installed() -> bool:
    from monailabel.app import app as server

    paths = {getattr(r, "path", None) for r in server.router.routes}
    return {METRICS, HEALTH_LIVE, HEALTH_READY} <= paths and any(_is_ours(m.cls) for m in server.user_middleware)


def _is_ours(cls: Any) -> bool:
    """This middleware, also when its module was loaded again (``POST /reload``)."""
    return (
        getattr(cls, "__qualname__", None) == OperationsMiddleware.__qualname__
        and getattr(cls, "__module__", None) == OperationsMiddleware.__module__
    )
