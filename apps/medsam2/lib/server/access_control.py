"""Access control for the app when MONAI Label's authentication is on (``MONAI_LABEL_AUTH_ENABLE=true``).

MONAI Label 0.8.5 checks a role per endpoint (its ``RBAC`` dependency) against the roles of a JWT issued by an
OpenID Connect identity provider (Keycloak), but on its own:

- it validates tokens with ``jwt.decode`` without ``algorithms``, which PyJWT 2 (required by MONAI Label) refuses:
  every token, valid or not, is answered 401, so nobody can use an authenticated server;
- ``POST /reload`` (drops and re-creates the app) has no check at all: anyone can call it;
- ``PUT``/``DELETE /model/{model}`` (replace or delete the model weights) are documented as admin-only but check
  the annotator role;
- a wrong password at ``POST /auth/token``, an unreachable identity provider, or a token without a user name or
  roles claim end in a 500.

:func:`install` fixes these in the running server: tokens are validated here (signature with the realm's public
key, an RSA algorithm, expiry required), and an ASGI middleware refuses every request without a valid token,
except the public paths (API docs, static viewer files, the login endpoints), before any route runs. So a route
added later without a role check is closed too. MONAI Label's per-route role checks still apply behind it.
"""

from __future__ import annotations

import json
import logging
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import requests
from starlette.concurrency import run_in_threadpool

from lib.errors import Refused
from lib.server.server_process import in_server

logger = logging.getLogger(__name__)

# Keycloak publishes the realm's RSA key; HMAC and "none" are never accepted (no key confusion).
ACCEPTED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
CLOCK_SKEW_S = 10
KEY_REFRESH_MIN_INTERVAL_S = 60.0

# Open without a token. The API description and the viewer's static files hold no patient data; Slicer asks
# /auth/ whether to log in and logs in through /auth/token. The /auth paths are under MONAI_LABEL_API_STR.
# Load balancers and orchestrators probe /health/live and /health/ready without credentials (their answers
# say only alive/ready and why not); /metrics needs a token like every other route.
PUBLIC_PATHS = frozenset({"/", "/docs", "/openapi.json", "/favicon.ico", "/health/live", "/health/ready"})
PUBLIC_API_PATHS = frozenset({"/auth/", "/auth/token"})
PUBLIC_PREFIXES = ("/static/",)
TOKEN_CHECK_PATH = "/auth/token/valid"  # says whether a token is valid: any valid token may ask
LOGS_PATH = "/logs"  # admin only, whatever MONAI Label's own check on a route below it says


@dataclass(frozen=True)
class Roles:
    """MONAI Label's four role names (``MONAI_LABEL_AUTH_ROLE_*``)."""

    admin: str = "monailabel-admin"
    reviewer: str = "monailabel-reviewer"
    annotator: str = "monailabel-annotator"
    user: str = "monailabel-user"

    def all(self) -> tuple[str, ...]:
        return (self.admin, self.reviewer, self.annotator, self.user)


def _api_path(path: str, api_prefix: str) -> str | None:
    """The path below MONAI Label's API prefix (``MONAI_LABEL_API_STR``), None if outside it."""
    if not api_prefix:
        return path
    return path[len(api_prefix) :] if path.startswith(api_prefix + "/") else None


def is_public(path: str, api_prefix: str = "") -> bool:
    """Paths served without a token."""
    if path in PUBLIC_PATHS or _api_path(path, api_prefix) in PUBLIC_API_PATHS:
        return True
    return path.startswith(PUBLIC_PREFIXES) and ".." not in path.split("/")


def required_roles(method: str, path: str, roles: Roles, api_prefix: str = "") -> tuple[str, ...]:
    """Roles of which a caller needs one (on top of MONAI Label's per-route check); () for any valid token."""
    api_path = _api_path(path, api_prefix) or ""
    if api_path == TOKEN_CHECK_PATH:
        return ()
    if method == "POST" and path == "/reload":
        return (roles.admin,)
    if method in ("PUT", "DELETE") and api_path.startswith("/model/"):
        return (roles.admin,)
    if api_path == LOGS_PATH or api_path.startswith(LOGS_PATH + "/"):  # the server log, nvidia-smi
        return (roles.admin,)
    return roles.all()


def pem_from_realm_key(key: str) -> str:
    """Keycloak's realm ``public_key`` (base64 DER, no header) as PEM."""
    body = "\n".join(textwrap.wrap("".join(key.split()), 64))
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"


class RealmPublicKey:
    """The identity provider's public key, fetched from the realm URI (Keycloak: ``{"public_key": ...}``).

    Kept until a token fails its signature check; then fetched again (at most once a minute), so a key
    rotated at the identity provider is picked up without a restart.
    """

    def __init__(self, realm_uri: str, timeout_s: float):
        self.realm_uri = realm_uri
        self.timeout_s = timeout_s
        self._pem: str | None = None
        self._fetched_at = 0.0
        self._lock = threading.Lock()

    def get(self) -> str:
        with self._lock:
            if self._pem is None:
                self._fetch()
            return self._pem  # type: ignore[return-value]

    def refresh(self) -> bool:
        """Fetch again unless fetched recently; True if the key changed."""
        with self._lock:
            if time.monotonic() - self._fetched_at < KEY_REFRESH_MIN_INTERVAL_S:
                return False
            before = self._pem
            self._fetch()
            return self._pem != before

    def _fetch(self) -> None:
        self._fetched_at = time.monotonic()
        where = f"the identity provider at {self.realm_uri} (MONAI_LABEL_AUTH_REALM_URI)"
        try:
            response = requests.get(self.realm_uri, timeout=self.timeout_s)
            response.raise_for_status()
            key = response.json()["public_key"]
        except requests.RequestException as e:
            raise Refused(503, f"Cannot fetch the token signing key from {where}: {type(e).__name__}.") from None
        except (ValueError, KeyError, TypeError):
            raise Refused(503, f"{where} did not answer a JSON realm with a 'public_key'.") from None
        logger.info("Fetched the token signing key from %s", self.realm_uri)
        self._pem = pem_from_realm_key(str(key))


class TokenValidator:
    """Checks a bearer token: signed by the realm's key with an RSA algorithm, not expired, has ``exp``."""

    def __init__(self, key: RealmPublicKey):
        self.key = key

    def claims(self, token: str) -> dict[str, Any]:
        try:
            return self._decode(token, self.key.get())
        except jwt.InvalidSignatureError:
            try:
                changed = self.key.refresh()
            except Refused as e:  # keep the key we have
                logger.warning("Could not refresh the token signing key: %s", e.detail)
                changed = False
            if changed:
                return self.claims(token)
            raise Refused(401, "The access token is not signed by the identity provider.") from None

    def _decode(self, token: str, pem: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                pem,
                algorithms=list(ACCEPTED_ALGORITHMS),
                options={"verify_signature": True, "verify_exp": True, "verify_aud": False, "require": ["exp"]},
                leeway=CLOCK_SKEW_S,
            )
        except jwt.InvalidSignatureError:
            raise
        except jwt.ExpiredSignatureError:
            raise Refused(401, "The access token has expired: log in again for a new one.") from None
        except jwt.InvalidAlgorithmError:
            raise Refused(401, f"The access token must be signed with one of {ACCEPTED_ALGORITHMS}.") from None
        except jwt.PyJWTError as e:
            raise Refused(401, f"The access token is not valid: {e}.") from None


@dataclass(frozen=True)
class ClaimNames:
    """Where the user's fields are in the token (``MONAI_LABEL_AUTH_TOKEN_*``); roles as a ``#``-separated path."""

    username: str = "preferred_username"
    email: str = "email"
    name: str = "name"
    roles: str = "realm_access#roles"


def user_fields(claims: dict[str, Any], names: ClaimNames) -> dict[str, Any]:
    """User name, e-mail, name and roles from validated claims; a token naming no user is refused."""
    username = claims.get(names.username) or claims.get("sub")
    if not isinstance(username, str) or not username:
        raise Refused(401, f"The access token names no user (no '{names.username}' or 'sub' claim).")
    node: Any = claims
    for part in names.roles.split("#"):
        node = node.get(part) if isinstance(node, dict) else None
    roles = [r for r in node if isinstance(r, str)] if isinstance(node, list) else []
    email, name = claims.get(names.email), claims.get(names.name)
    return {
        "username": username,
        "email": email if isinstance(email, str) else None,
        "name": name if isinstance(name, str) else None,
        "roles": roles,
    }


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    for key, value in headers:
        if key.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


async def _send_json(send: Callable, status: int, detail: str, extra_headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class AccessControlMiddleware:
    """ASGI middleware: every non-public request needs a valid bearer token and one of the route's roles."""

    def __init__(
        self, app: Callable, validator: TokenValidator, claim_names: ClaimNames, roles: Roles, api_prefix: str = ""
    ):
        self.app = app
        self.validator = validator
        self.claim_names = claim_names
        self.roles = roles
        self.api_prefix = api_prefix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method = scope["method"]
        if not is_public(path, self.api_prefix):
            token = bearer_token(scope["headers"])
            if token is None:
                logger.info("401 %s %s: no bearer token", method, path)
                detail = "Not authenticated: send 'Authorization: Bearer <access token>' (log in at POST /auth/token)."
                await _send_json(send, 401, detail, [(b"www-authenticate", b"Bearer")])
                return
            try:
                claims = await run_in_threadpool(self.validator.claims, token)
                user = user_fields(claims, self.claim_names)
            except Refused as e:
                logger.info("%d %s %s: %s", e.status, method, path, e.detail)
                extra = [(b"www-authenticate", b'Bearer error="invalid_token"')] if e.status == 401 else None
                await _send_json(send, e.status, e.detail, extra)
                return
            needed = required_roles(method, path, self.roles, self.api_prefix)
            if needed and not set(needed) & set(user["roles"]):
                logger.info("403 %s %s: user %s lacks %s", method, path, user["username"], needed)
                wanted = " or ".join(f'"{r}"' for r in needed)
                await _send_json(send, 403, f"Role {wanted} is required to perform this action.")
                return
        if method == "POST" and _api_path(path, self.api_prefix) == "/auth/token":
            await self._login(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _login(self, scope: dict, receive: Callable, send: Callable) -> None:
        """MONAI Label forwards the password to the identity provider and lets its refusal end in a 500."""
        try:
            await self.app(scope, receive, send)
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 502
            if status in (400, 401, 403):
                await _send_json(send, 401, "The identity provider refused this user name and password.")
            else:
                await _send_json(send, 502, f"The identity provider answered {status} to the login.")
        except requests.RequestException as e:
            await _send_json(send, 503, f"Cannot reach the identity provider to log in: {type(e).__name__}.")


def install(settings: Any) -> bool:
    """With ``settings.MONAI_LABEL_AUTH_ENABLE``: validate tokens here and guard the running server.

    Idempotent (the app is re-created on ``POST /reload``). False when auth is off or no server runs.
    """
    if not settings.MONAI_LABEL_AUTH_ENABLE or not in_server():
        return False
    from monailabel.app import app as server
    from monailabel.endpoints.user import auth
    from starlette.middleware import Middleware

    key = RealmPublicKey(settings.MONAI_LABEL_AUTH_REALM_URI, float(settings.MONAI_LABEL_AUTH_TIMEOUT))
    validator = TokenValidator(key)
    claim_names = ClaimNames(
        username=settings.MONAI_LABEL_AUTH_TOKEN_USERNAME,
        email=settings.MONAI_LABEL_AUTH_TOKEN_EMAIL,
        name=settings.MONAI_LABEL_AUTH_TOKEN_NAME,
        roles=settings.MONAI_LABEL_AUTH_TOKEN_ROLES,
    )
    roles = Roles(
        admin=settings.MONAI_LABEL_AUTH_ROLE_ADMIN,
        reviewer=settings.MONAI_LABEL_AUTH_ROLE_REVIEWER,
        annotator=settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
        user=settings.MONAI_LABEL_AUTH_ROLE_USER,
    )

    def from_token(token: str) -> Any:
        """Replaces MONAI Label's validator (used by its RBAC checks); its errors become 401 there."""
        try:
            return auth.User(**user_fields(validator.claims(token), claim_names))
        except Refused as e:
            if e.status == 401:
                raise jwt.InvalidTokenError(e.detail) from None
            raise

    auth.from_token = from_token
    server.user_middleware = [m for m in server.user_middleware if not _is_access_control(m.cls)]
    server.user_middleware.append(
        Middleware(
            AccessControlMiddleware,
            validator=validator,
            claim_names=claim_names,
            roles=roles,
            api_prefix=settings.MONAI_LABEL_API_STR.rstrip("/"),
        )
    )
    server.middleware_stack = None  # rebuilt with the middleware on the next request
    try:
        key.get()
    except Refused as e:
        logger.warning("Authentication is on, but: %s Every request will be refused until it answers.", e.detail)
    logger.info("Access control on: realm %s, roles %s", settings.MONAI_LABEL_AUTH_REALM_URI, roles.all())
    return True


def is_installed() -> bool:
    """MONAI Label's role checks use this module's token validator and the middleware is in the server."""
    from monailabel.app import app as server
    from monailabel.endpoints.user import auth

    ours = getattr(auth.from_token, "__module__", None) == __name__
    return ours and any(_is_access_control(m.cls) for m in server.user_middleware)


def _is_access_control(cls: Any) -> bool:
    """This middleware, also when its module was loaded again (the app is re-created on ``POST /reload``)."""
    return (
        getattr(cls, "__qualname__", None) == AccessControlMiddleware.__qualname__
        and getattr(cls, "__module__", None) == AccessControlMiddleware.__module__
    )
