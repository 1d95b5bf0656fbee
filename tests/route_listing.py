"""Every route MONAI Label's FastAPI app mounts (hidden ones included), listed from the app object itself in a
fresh interpreter (importing ``monailabel.app`` builds the server's routes): a script for ``python -c``."""

from __future__ import annotations

ROUTE_LISTER = """
import json
from fastapi.routing import APIRoute
from starlette.routing import Mount, Route
from monailabel.app import app
from monailabel.endpoints.user.auth import RBAC

def rbac_roles(calls):
    return [r for c in calls if isinstance(c, RBAC) for r in ([c.roles] if isinstance(c.roles, str) else c.roles)]

def dependency_calls(dependant):
    calls = []
    for dep in dependant.dependencies:
        calls += [dep.call] + dependency_calls(dep)
    return calls

def walk(routes, prefix="", router_calls=()):
    for r in routes:
        if hasattr(r, "original_router"):  # FastAPI >= 0.13x keeps included routers as such
            context = r.include_context
            calls = router_calls + tuple(d.dependency for d in context.dependencies)
            yield from walk(r.original_router.routes, prefix + context.prefix, calls)
        elif isinstance(r, APIRoute):
            roles = rbac_roles(list(router_calls) + dependency_calls(r.dependant))
            yield {"path": prefix + r.path, "methods": sorted(r.methods), "roles": roles}
        elif isinstance(r, Route):
            yield {"path": prefix + r.path, "methods": sorted(r.methods or []), "roles": rbac_roles(router_calls)}
        elif isinstance(r, Mount):
            yield {"path": prefix + r.path + "/{path:path}", "methods": ["GET"], "roles": [], "mount": True}
        else:
            raise SystemExit(f"unknown route type {type(r)}")

print(json.dumps(list(walk(app.routes))))
"""
