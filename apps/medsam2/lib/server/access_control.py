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

:func:`install` fixes these in the running server: tokens are validated here (any OpenID Connect provider: its
keys from the JWKS its discovery document names, an RSA algorithm, expiry, issuer and audience required), API keys
(``X-API-Key``, :mod:`lib.server.api_keys`) are accepted for scripts and 3D Slicer, and an ASGI middleware refuses
every request without valid credentials, except the public paths (API docs, static viewer files, the login
endpoints), before any route runs. So a route added later without a role check is closed too. MONAI Label's
per-route role checks still apply behind it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import requests
from starlette.concurrency import run_in_threadpool

from lib.errors import Refused
from lib.server.api_keys import KEY_PREFIX, ApiKey, ApiKeyStore, roles_of
from lib.server.server_process import in_server

logger = logging.getLogger(__name__)

# OpenID providers sign with RSA keys; HMAC and "none" are never accepted (no key confusion).
ACCEPTED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
CLOCK_SKEW_S = 10
KEY_REFRESH_MIN_INTERVAL_S = 60.0
KEYS_COOLDOWN_S = 10.0  # a token with an unknown key id fetches the provider's keys again at most this often

# Open without a token. The API description and the viewer's static files hold no patient data; Slicer asks
# /auth/ whether to log in and logs in through /auth/token. The /auth paths are under MONAI_LABEL_API_STR.
# Load balancers and orchestrators probe /health/live and /health/ready without credentials (their answers
# say only alive/ready and why not); /metrics needs a token like every other route.
PUBLIC_PATHS = frozenset({"/", "/docs", "/openapi.json", "/favicon.ico", "/health/live", "/health/ready"})
PUBLIC_API_PATHS = frozenset({"/auth/", "/auth/token"})
PUBLIC_PREFIXES = ("/static/",)
TOKEN_CHECK_PATH = "/auth/token/valid"  # says whether a token is valid: any valid token may ask
LOGS_PATH = "/logs"  # admin only, whatever MONAI Label's own check on a route below it says
# The OHIF viewer's files (GET only): the page must load in the browser before OHIF can log its user in at the
# identity provider; it holds no patient data (studies come through /proxy/dicom, which needs a token).
PUBLIC_VIEWER_PREFIX = "/ohif/"
API_KEY_HEADER = b"x-api-key"
NOT_AUTHENTICATED = (
    "Not authenticated: send 'Authorization: Bearer <access token>' (log in at your identity provider, or at "
    "POST /auth/token) or 'X-API-Key: <key>'."
)


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


def is_public(path: str, api_prefix: str = "", method: str = "GET") -> bool:
    """Paths served without a token."""
    if path in PUBLIC_PATHS or _api_path(path, api_prefix) in PUBLIC_API_PATHS:
        return True
    return (path.startswith(PUBLIC_PREFIXES) and ".." not in path.split("/")) or is_viewer_file(path, method)


def is_viewer_file(path: str, method: str) -> bool:
    """``GET /ohif/...``: the OHIF viewer's files, open without a token."""
    viewer = path.startswith(PUBLIC_VIEWER_PREFIX) or path == "/ohif"
    return method in ("GET", "HEAD") and viewer and ".." not in path.split("/")


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


@dataclass(frozen=True)
class TokenRules:
    """What a token must say besides its signature: who issued it and whom it is for."""

    audience: str  # --conf auth_audience (default: MONAI_LABEL_AUTH_CLIENT_ID)
    issuer: str = ""  # '': the issuer the discovery document names


class IdentityProvider:
    """An OpenID Connect provider's discovery document (``<issuer>/.well-known/openid-configuration``) and its
    signing keys (the document's ``jwks_uri``, read by PyJWT's :class:`jwt.PyJWKClient`).

    Any OpenID Connect provider works (Keycloak: the realm URL; Entra ID, Google, Okta, Authentik, Dex: the
    issuer URL). The document is read once (again after a failure, at most once a minute); the keys are cached
    five minutes and fetched again (at most every 10 s) for a token whose key id (``kid``) is not among them, so
    a key rotated at the provider is picked up without a restart.
    """

    def __init__(self, issuer_uri: str, timeout_s: float):
        self.issuer_uri = issuer_uri.rstrip("/")
        self.timeout_s = timeout_s
        self._document: dict[str, Any] | None = None
        self._jwks: jwt.PyJWKClient | None = None
        self._failed_at = -KEY_REFRESH_MIN_INTERVAL_S
        self._failure = ""
        self._lock = threading.Lock()

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer_uri}/.well-known/openid-configuration"

    def document(self) -> dict[str, Any]:
        """The discovery document; :class:`Refused` 503 naming the provider when it cannot be read."""
        with self._lock:
            if self._document is None:
                if time.monotonic() - self._failed_at < KEY_REFRESH_MIN_INTERVAL_S and self._failure:
                    raise Refused(503, self._failure)
                self._fetch()
            return self._document  # type: ignore[return-value]

    def _fetch(self) -> None:
        where = f"the identity provider at {self.discovery_url} (MONAI_LABEL_AUTH_REALM_URI)"
        try:
            response = requests.get(self.discovery_url, timeout=self.timeout_s)
            response.raise_for_status()
            document = response.json()
            if not isinstance(document, dict) or not document.get("jwks_uri") or not document.get("issuer"):
                raise ValueError
        except requests.RequestException as e:
            self._fail(f"Cannot read {where}: {type(e).__name__}.")
        except (ValueError, TypeError):
            self._fail(f"{where} did not answer an OpenID configuration with 'issuer' and 'jwks_uri'.")
        logger.info("OpenID configuration of %s read: keys at %s", document["issuer"], document["jwks_uri"])
        self._document = document
        self._jwks = jwt.PyJWKClient(document["jwks_uri"], timeout=self.timeout_s, cooldown_duration=KEYS_COOLDOWN_S)

    def _fail(self, message: str) -> None:
        self._failed_at, self._failure = time.monotonic(), message
        raise Refused(503, message)

    def signing_key(self, token: str) -> Any:
        """The provider's public key that signed ``token`` (by its ``kid``); 401 for a key it does not publish."""
        self.document()
        assert self._jwks is not None
        try:
            return self._jwks.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as e:
            raise Refused(503, f"Cannot fetch the token signing keys of the identity provider: {e}.") from None
        except jwt.PyJWKClientError:
            raise Refused(401, "The access token is not signed by a key of the identity provider.") from None
        except jwt.PyJWTError as e:
            raise Refused(401, f"The access token is not valid: {e}.") from None


class TokenValidator:
    """Checks a bearer token: signed by a key of the provider with an RSA algorithm, not expired, issued by the
    provider and meant for this server (``aud``)."""

    def __init__(self, provider: IdentityProvider, rules: TokenRules):
        self.provider = provider
        self.rules = rules

    def claims(self, token: str) -> dict[str, Any]:
        key = self.provider.signing_key(token)
        issuer = self.rules.issuer or str(self.provider.document()["issuer"])
        try:
            return jwt.decode(
                token,
                key,
                algorithms=list(ACCEPTED_ALGORITHMS),
                audience=self.rules.audience,
                issuer=issuer,
                options={"require": ["exp", "iss", "aud"]},
                leeway=CLOCK_SKEW_S,
            )
        except jwt.ExpiredSignatureError:
            raise Refused(401, "The access token has expired: log in again for a new one.") from None
        except jwt.InvalidAlgorithmError:
            raise Refused(401, f"The access token must be signed with one of {ACCEPTED_ALGORITHMS}.") from None
        except jwt.InvalidIssuerError:
            raise Refused(
                401,
                f"The access token was not issued by {issuer}, the identity provider this "
                "server trusts: log in there.",
            ) from None
        except jwt.InvalidAudienceError:
            raise Refused(
                401,
                f"The access token is not meant for this server: its audience ('aud') must "
                f"include '{self.rules.audience}' (--conf auth_audience).",
            ) from None
        except jwt.MissingRequiredClaimError as e:
            raise Refused(401, f"The access token has no '{e.claim}' claim.") from None
        except jwt.InvalidSignatureError:
            raise Refused(401, "The access token is not signed by the identity provider.") from None
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


def api_key_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key of an ``X-API-Key`` header, if any."""
    for key, value in headers:
        if key.lower() == API_KEY_HEADER and value.strip():
            return value.decode("latin-1").strip()
    return None


# The user the middleware checked a request as without a token (an API key, the viewer's files), for MONAI
# Label's own role checks (see :func:`from_checked_request`).
_CHECKED_USER: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("medsam2_user", default=None)
# what the middleware puts in the Authorization header of a checked API key request: MONAI Label's role check
# reads that header; a client cannot send it itself (a secret of this process, and only with the user set above)
_CHECKED_MARKER = "medsam2-checked." + secrets.token_urlsafe(32)


def from_checked_request(token: str) -> dict[str, Any] | None:
    """The user of a request the middleware checked without a token (None for any other token)."""
    user = _CHECKED_USER.get()
    return user if user is not None and secrets.compare_digest(token, _CHECKED_MARKER) else None


def api_key_user(entry: ApiKey, roles: Roles) -> dict[str, Any]:
    """User fields for an API key: ``api-key:<name>`` with the MONAI Label roles its role includes."""
    names = {"user": roles.user, "annotator": roles.annotator, "reviewer": roles.reviewer, "admin": roles.admin}
    held = [names[r] for r in roles_of(entry.role)]
    return {"username": f"api-key:{entry.name}", "email": None, "name": f"API key {entry.id}", "roles": held}


def _with_marker(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() not in (b"authorization", API_KEY_HEADER)]
    return [*kept, (b"authorization", f"Bearer {_CHECKED_MARKER}".encode())]


class AccessControlMiddleware:
    """ASGI middleware: every non-public request needs a valid bearer token or API key, and one of the route's
    roles."""

    def __init__(
        self,
        app: Callable,
        validator: TokenValidator,
        claim_names: ClaimNames,
        roles: Roles,
        api_prefix: str = "",
        api_keys: ApiKeyStore | None = None,
    ):
        self.app = app
        self.validator = validator
        self.claim_names = claim_names
        self.roles = roles
        self.api_prefix = api_prefix
        self.api_keys = api_keys

    def _user(self, scope: dict) -> tuple[dict[str, Any], bool]:
        """(the caller, whether by an API key), from the bearer token (first) or the API key; :class:`Refused`
        401/503."""
        token, key = bearer_token(scope["headers"]), api_key_header(scope["headers"])
        if token is not None and token.startswith(KEY_PREFIX):
            # an API key as the bearer token: what OHIF sends to the DICOMweb proxy when the panel gave it a key
            # (OHIF's DICOMweb client keeps only the Authorization header of its credentials)
            token, key = None, token
        if token is not None:
            return user_fields(self.validator.claims(token), self.claim_names), False
        if key is not None and self.api_keys is not None:
            return api_key_user(self.api_keys.check(key), self.roles), True
        if key is not None:
            raise Refused(401, "This server takes no API keys (--conf api_keys_file is not set): log in instead.")
        raise Refused(401, NOT_AUTHENTICATED)

    @staticmethod
    def _checked_as(scope: dict, user: dict[str, Any]) -> None:
        """Let MONAI Label's role check (which reads the Authorization header) see ``user`` for this request."""
        scope["headers"] = _with_marker(scope["headers"])
        _CHECKED_USER.set(user)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method = scope["method"]
        if is_viewer_file(path, method):  # MONAI Label's route asks for the user role: a viewer without one
            self._checked_as(
                scope, {"username": "ohif-viewer-files", "email": None, "name": None, "roles": [self.roles.user]}
            )
        elif not is_public(path, self.api_prefix, method):
            try:
                user, by_api_key = await run_in_threadpool(self._user, scope)
            except Refused as e:
                logger.info("%d %s %s: %s", e.status, method, path, e.detail)
                challenge = b'Bearer error="invalid_token"' if e.detail != NOT_AUTHENTICATED else b"Bearer"
                extra = [(b"www-authenticate", challenge)] if e.status == 401 else None
                await _send_json(send, e.status, e.detail, extra)
                return
            needed = required_roles(method, path, self.roles, self.api_prefix)
            if needed and not set(needed) & set(user["roles"]):
                logger.info("403 %s %s: user %s lacks %s", method, path, user["username"], needed)
                wanted = " or ".join(f'"{r}"' for r in needed)
                await _send_json(send, 403, f"Role {wanted} is required to perform this action.")
                return
            if by_api_key:
                self._checked_as(scope, user)
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


@dataclass(frozen=True)
class AuthOptions:
    """The app's own login settings (``--conf auth_audience``, ``auth_issuer``, ``api_keys_file``,
    ``ohif_client_id``)."""

    audience: str = ""  # '': MONAI_LABEL_AUTH_CLIENT_ID
    issuer: str = ""  # '': the discovery document's
    api_keys_file: str = ""  # '': no API keys
    ohif_client_id: str = ""  # '': OHIF without a login of its own (lib.server.ohif_viewer)


def install(settings: Any, options: AuthOptions | None = None) -> bool:
    """With ``settings.MONAI_LABEL_AUTH_ENABLE``: validate tokens and API keys here and guard the running server.

    Idempotent (the app is re-created on ``POST /reload``). False when auth is off or no server runs.
    """
    options = options or AuthOptions()
    if not settings.MONAI_LABEL_AUTH_ENABLE or not in_server():
        return False
    from monailabel.app import app as server
    from monailabel.endpoints.user import auth
    from starlette.middleware import Middleware

    provider = IdentityProvider(settings.MONAI_LABEL_AUTH_REALM_URI, float(settings.MONAI_LABEL_AUTH_TIMEOUT))
    rules = TokenRules(audience=options.audience or settings.MONAI_LABEL_AUTH_CLIENT_ID, issuer=options.issuer)
    validator = TokenValidator(provider, rules)
    api_keys = ApiKeyStore(Path(options.api_keys_file)) if options.api_keys_file else None
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
        checked = from_checked_request(token)
        if checked is not None:
            return auth.User(**checked)
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
            api_keys=api_keys,
        )
    )
    server.middleware_stack = None  # rebuilt with the middleware on the next request
    try:
        provider.document()
    except Refused as e:
        logger.warning("Authentication is on, but: %s Tokens are refused until it answers.", e.detail)
    logger.info(
        "Access control on: identity provider %s, audience %s, API keys %s, roles %s",
        settings.MONAI_LABEL_AUTH_REALM_URI,
        rules.audience,
        options.api_keys_file or "off",
        roles.all(),
    )
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
