"""Access control: the real server with MONAI Label's authentication on, against a local identity provider.

The identity provider is a small HTTP server here that answers what MONAI Label asks Keycloak for (the realm's
public key, the OpenID configuration, the password grant), with an RSA key made for the test; tokens are
signed by it with PyJWT. Every route of the running app (MONAI Label's routes, hidden ones included, plus the
app's from its OpenAPI description) is tried without a token and with bad tokens, and with too few roles.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from route_listing import ROUTE_LISTER

from conftest import free_port, start_server, stop_server, write_image
from lib.errors import Refused
from lib.server.access_control import (
    KEYS_COOLDOWN_S,
    ClaimNames,
    IdentityProvider,
    Roles,
    is_public,
    required_roles,
    user_fields,
)
from lib.server.api_keys import ROLE_ORDER, ApiKeyStore, add_key, revoke_key
from sam2_testing import blob_volume

ADMIN, REVIEWER, ANNOTATOR, USER = "monailabel-admin", "monailabel-reviewer", "monailabel-annotator", "monailabel-user"
ALL_ROLES = (ADMIN, REVIEWER, ANNOTATOR, USER)
CLIENT_ID = "medsam2-test-client"
KID = "realm-key-1"
PASSWORDS = {"alice": "correct horse"}

# Open without a token, on purpose (see lib/server/access_control.py): API description, static viewer files, login.
PUBLIC = {("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/favicon.ico")}
PUBLIC |= {("GET", "/auth/"), ("POST", "/auth/token")}
PUBLIC |= {("GET", "/ohif/{path:path}")}  # the viewer's files: OHIF must load before it can log its user in
# Admin-only, though MONAI Label checks nothing (/reload) or only the annotator role (model weights).
TIGHTENED = {("POST", "/reload"): ADMIN, ("PUT", "/model/{model}"): ADMIN, ("DELETE", "/model/{model}"): ADMIN}
PATH_VALUES = {"model": "medsam2_2d", "strategy": "random", "path": "index.html"}


class LocalIdentityProvider:
    """A Keycloak-shaped realm on 127.0.0.1: ``GET <realm>`` (public key), OpenID configuration, the password
    grant, and the authorization code grant with PKCE behind a login form (what OHIF's own login uses), its JSON
    open to other origins (CORS) as a provider's is."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = KID
        self.retired: list = []  # (key, kid) still published after a rotation
        self.port = free_port()
        self.realm_uri = f"http://127.0.0.1:{self.port}/realms/medsam2"
        self.issued: list[str] = []
        self.grants: list[dict[str, str]] = []
        self.codes: dict[str, dict[str, str]] = {}  # authorization code -> the login's request and user
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwks(self) -> dict:
        """The provider's published keys (JWKS): the realm key only."""
        published = [(self.key, self.kid), *self.retired]
        jwks = [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())) for key, _ in published]
        return {
            "keys": [
                {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}
                for jwk, (_, kid) in zip(jwks, published, strict=False)
            ]
        }

    def token(self, roles=ALL_ROLES, username="alice", expires_in=3600, key=None, kid="", **claims) -> str:
        """An access token shaped like Keycloak's, signed RS256 by the realm key (or ``key``) with key id ``kid``."""
        now = int(time.time())
        payload = {
            "iss": self.realm_uri,
            "aud": [CLIENT_ID, "account"],
            "sub": str(uuid.uuid4()),
            "azp": CLIENT_ID,
            "typ": "Bearer",
            "iat": now,
            "exp": now + expires_in,
            "preferred_username": username,
            "email": f"{username}@hospital.example",
            "name": username.title(),
            "realm_access": {"roles": list(roles)},
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        token = jwt.encode(
            payload, key or self.key, algorithm="RS256", headers={"kid": kid or self.kid} if kid is not None else None
        )
        self.issued.append(token)
        return token

    def authorize(self, form: dict[str, str]) -> str | None:
        """The login form's answer: where to send the browser (the client's redirect URI with a new code), or
        None for wrong credentials or a request without PKCE."""
        user = form.get("username", "")
        if PASSWORDS.get(user) != form.get("password") or form.get("code_challenge_method") != "S256":
            return None
        code = uuid.uuid4().hex
        self.codes[code] = {**{k: v for k, v in form.items() if k != "password"}, "user": user}
        return f"{form['redirect_uri']}?{urlencode({'code': code, 'state': form.get('state', '')})}"

    def exchange_code(self, form: dict[str, str]) -> dict | None:
        """The token answer for an authorization code (once, for its client, redirect URI and PKCE verifier)."""
        login = self.codes.pop(form.get("code", ""), None)
        if login is None or any(form.get(k) != login[k] for k in ("client_id", "redirect_uri")):
            return None
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != login["code_challenge"]:
            return None
        user, client = login["user"], login["client_id"]
        access = self.token(roles=(USER, ANNOTATOR), username=user, azp=client)
        claims = {"iss": self.realm_uri, "aud": client, "sub": f"user-{user}", "iat": int(time.time())}
        claims |= {"exp": int(time.time()) + 3600, "preferred_username": user, "name": user.title()}
        if login.get("nonce"):
            claims["nonce"] = login["nonce"]
        id_token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        return {"access_token": access, "id_token": id_token, "token_type": "Bearer", "expires_in": 3600}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self
        path = "/realms/medsam2"
        login_path = path + "/protocol/openid-connect/auth"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()
                self.wfile.write(data)

            def _form(self) -> dict[str, str]:
                length = int(self.headers.get("Content-Length", 0))
                return {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}

            def _login_page(self, query: dict[str, str], status: int = 200) -> None:
                hidden = "".join(
                    f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in query.items()
                )
                page = (
                    f'<html><body><form method="post" action="{login_path}">{hidden}'
                    '<input id="username" name="username"><input id="password" name="password" type="password">'
                    '<button id="login" type="submit">Sign in</button></form></body></html>'
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def do_OPTIONS(self) -> None:  # CORS preflight
                self.send_response(204)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Access-Control-Allow-Methods", "GET, POST")
                self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
                self.end_headers()

            def do_GET(self) -> None:
                if self.path.startswith(login_path + "?"):
                    self._login_page({k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()})
                elif self.path == path:
                    der = idp.key.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    )
                    self._json(200, {"realm": "medsam2", "public_key": base64.b64encode(der).decode()})
                elif self.path == path + "/.well-known/openid-configuration":
                    endpoints = {
                        "issuer": idp.realm_uri,
                        "authorization_endpoint": idp.realm_uri + "/protocol/openid-connect/auth",
                        "token_endpoint": idp.realm_uri + "/protocol/openid-connect/token",
                        "jwks_uri": idp.realm_uri + "/protocol/openid-connect/certs",
                        "response_types_supported": ["code"],
                        "code_challenge_methods_supported": ["S256"],
                    }
                    self._json(200, endpoints)
                elif self.path == path + "/protocol/openid-connect/certs":
                    self._json(200, idp.jwks())
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                if self.path == login_path:
                    form = self._form()
                    target = idp.authorize(form)
                    if target is None:
                        self._login_page({k: v for k, v in form.items() if k not in ("username", "password")}, 401)
                        return
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path != path + "/protocol/openid-connect/token":
                    self._json(404, {"error": "not found"})
                    return
                form = self._form()
                idp.grants.append({k: v for k, v in form.items() if k != "password"})
                user = form.get("username", "")
                if form.get("grant_type") == "authorization_code":
                    answer = idp.exchange_code(form)
                    if answer is None:
                        self._json(400, {"error": "invalid_grant", "error_description": "Invalid code or verifier"})
                    else:
                        self._json(200, answer)
                elif form.get("grant_type") == "password" and PASSWORDS.get(user) == form.get("password"):
                    token = idp.token(roles=(USER, ANNOTATOR), username=user, expires_in=300)
                    self._json(200, {"access_token": token, "token_type": "Bearer", "expires_in": 300})
                else:
                    self._json(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})

        return Handler

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def idp():
    provider = LocalIdentityProvider()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def auth_env(idp) -> dict[str, str]:
    return {
        "MONAI_LABEL_AUTH_ENABLE": "true",
        "MONAI_LABEL_AUTH_REALM_URI": idp.realm_uri,
        "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID,
        "MONAI_LABEL_AUTH_TIMEOUT": "5",
    }


@pytest.fixture(scope="module")
def auth_server(idp, auth_env, random_checkpoint, tmp_path_factory):
    """The real server, authentication on, on a studies folder of its own (the tests save a label)."""
    studies = tmp_path_factory.mktemp("auth_studies")
    write_image(
        blob_volume((12, 64, 72), radius=10.0),
        studies / "ct_blob.nii.gz",
        spacing=(0.8, 0.8, 2.5),
        origin=(0.0, 0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )
    log = tmp_path_factory.mktemp("auth_logs") / "server.log"
    keys_file = tmp_path_factory.mktemp("auth_keys") / "api_keys.json"
    keys = {role: add_key(keys_file, f"test-{role}", role)[1] for role in ROLE_ORDER}
    revoked_id, revoked = add_key(keys_file, "test-revoked", "admin")
    revoke_key(keys_file, revoked_id.id)
    conf = {"checkpoint": str(random_checkpoint), "window": "abdomen", "api_keys_file": str(keys_file)}
    server = start_server(studies, conf, log, env=auth_env, ready_headers=bearer(idp.token(roles=(USER,))))
    server.studies = studies
    server.keys_file, server.keys, server.revoked_key = keys_file, keys, revoked
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def routes(auth_server, auth_env) -> list[dict]:
    """Every (method, route) of the app: MONAI Label's (hidden ones too, read from its FastAPI app with
    authentication on, each with the role its RBAC dependency asks for) and the running server's OpenAPI
    description (anything the app adds), each with the role its summary documents."""
    env = {**os.environ, **auth_env}
    listed = subprocess.run(
        [sys.executable, "-c", ROUTE_LISTER], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    found: dict[tuple[str, str], dict] = {}
    for r in json.loads(listed.stdout.strip().splitlines()[-1]):
        for method in r["methods"]:
            if method != "HEAD" or r["path"] in ("/datastore/image", "/datastore/label"):  # HEAD: auto for GET
                found[(method, r["path"])] = {"roles": r["roles"], "mount": r.get("mount", False)}
    schema = requests.get(auth_server.url + "/openapi.json", timeout=30).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            entry = found.setdefault((method.upper(), path), {"roles": [], "mount": False})
            documented = re.match(r"\s*\|RBAC: ([^|]+)\|", operation.get("summary", ""))
            entry["documented"] = documented.group(1).strip() if documented else None
    return [{"method": m, "path": p, **info} for (m, p), info in sorted(found.items())]


def concrete(path: str) -> str:
    """A request path for a route template: ``/infer/{model}`` -> ``/infer/medsam2_2d``."""
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PATH_VALUES.get(m.group(1), "x"), path)


def call(server, method: str, path: str, headers=None, stream=False) -> requests.Response:
    url = server.url + concrete(path)
    return requests.request(method, url, headers=headers, timeout=60, allow_redirects=False, stream=stream)


def needed_role(route: dict) -> str | None:
    """The role a route asks for: ours where we tightened it, else the documented one, else MONAI Label's check."""
    key = (route["method"], route["path"])
    if key in TIGHTENED:
        return TIGHTENED[key]
    if route.get("documented"):
        return route["documented"]
    return route["roles"][0] if route["roles"] else None


def protected(routes: list[dict]) -> list[dict]:
    return [r for r in routes if (r["method"], r["path"]) not in PUBLIC and not r["mount"]]


def test_routes_cover_the_app(routes):
    keys = {(r["method"], r["path"]) for r in routes}
    for must in [
        ("POST", "/infer/{model}"),
        ("POST", "/train/{model}"),
        ("POST", "/train/"),
        ("PUT", "/datastore/label"),
        ("GET", "/datastore/"),
        ("POST", "/activelearning/{strategy}"),
        ("GET", "/info/"),
        ("PUT", "/session/"),
        ("POST", "/scoring/{method}"),
        ("POST", "/batch/infer/{model}"),
        ("GET", "/ohif/{path:path}"),
        ("GET", "/proxy/dicom/{path:path}"),
        ("POST", "/reload"),
        ("GET", "/auth/token/valid"),
    ]:
        assert must in keys, must
    assert len(protected(routes)) >= 45, len(protected(routes))


def forged_claims() -> dict:
    return {"preferred_username": "mallory", "realm_access": {"roles": list(ALL_ROLES)}, "exp": int(time.time()) + 600}


def hmac_with_public_key(idp: LocalIdentityProvider) -> str:
    """The algorithm-confusion forgery: HS256 keyed with the (public) RSA key; PyJWT will not make it."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = header + "." + b64(json.dumps(forged_claims()).encode())
    signature = hmac.new(idp.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def test_every_route_refuses_missing_and_bad_tokens(auth_server, routes, idp):
    """No token, garbage, another key's signature, expired, alg none, HMAC keyed with the public key: 401."""
    hmac_forged = hmac_with_public_key(idp)
    unsigned = jwt.encode(forged_claims(), None, algorithm="none")
    bad = {
        "no token": None,
        "not a JWT": bearer("not-a-jwt"),
        "other key": bearer(idp.token(key=idp.other_key)),
        "expired": bearer(idp.token(expires_in=-120)),
        "alg none": bearer(unsigned),
        "HS256 with the public key": bearer(hmac_forged),
        "no exp": bearer(idp.token(exp=None)),
        "Basic scheme": {"Authorization": "Basic YWxpY2U6Y29ycmVjdCBob3JzZQ=="},
        "wrong issuer": bearer(idp.token(iss="http://127.0.0.1:1/realms/other")),
        "wrong audience": bearer(idp.token(aud="another-app")),
        "no audience": bearer(idp.token(aud=None)),
        "no key id": bearer(idp.token(kid=None)),
        "unknown API key": {"X-API-Key": "msk_000000000000_" + "x" * 43},
        "revoked API key": {"X-API-Key": auth_server.revoked_key},
    }
    failures, tried = [], 0
    for route in protected(routes):
        for what, headers in bad.items():
            r = call(auth_server, route["method"], route["path"], headers)
            tried += 1
            if r.status_code != 401 or "bearer" not in r.headers.get("www-authenticate", "").lower():
                failures.append((route["method"], route["path"], what, r.status_code, r.text[:200]))
    assert not failures, failures
    print(f"{tried} refused requests on {len(protected(routes))} routes")


def test_only_the_documented_paths_are_open(auth_server, routes):
    opened = set()
    for route in routes:
        if not route["mount"] and call(auth_server, route["method"], route["path"]).status_code not in (401, 403):
            opened.add((route["method"], route["path"]))
    assert opened == PUBLIC
    assert call(auth_server, "GET", "/static/favicon.ico").status_code == 200  # static files: open
    for path in ("/no-such-route", "/info", "/static", "/reload/"):
        assert call(auth_server, "GET", path).status_code == 401, path  # default deny, even where nothing is


def test_every_route_needs_its_role(auth_server, routes, idp):
    """A valid token without MONAI Label roles, or with every role but the one needed: 403."""
    roleless = bearer(idp.token(roles=()))
    no_realm_access = bearer(idp.token(realm_access=None))
    failures, tried = [], 0
    for route in protected(routes):
        expect = 200 if route["path"] == "/auth/token/valid" else 403
        for what, headers in (("no roles", roleless), ("no realm_access claim", no_realm_access)):
            r = call(auth_server, route["method"], route["path"], headers)
            tried += 1
            if r.status_code != expect:
                failures.append((route["method"], route["path"], what, r.status_code, r.text[:200]))
        role = needed_role(route)
        if role:
            others = [r for r in ALL_ROLES if r != role]
            r = call(auth_server, route["method"], route["path"], bearer(idp.token(roles=others)))
            tried += 1
            if r.status_code != 403 or (route["method"] != "HEAD" and role not in r.text):  # HEAD: no body
                failures.append((route["method"], route["path"], f"all but {role}", r.status_code, r.text[:200]))
        short = role.removeprefix("monailabel-") if role else "user"
        if short != "user":  # the API key one role below it (key roles nest: user < annotator < reviewer < admin)
            below = ROLE_ORDER[ROLE_ORDER.index(short) - 1]
            r = call(auth_server, route["method"], route["path"], {"X-API-Key": auth_server.keys[below]})
            tried += 1
            if r.status_code != 403 or (route["method"] != "HEAD" and role not in r.text):
                failures.append((route["method"], route["path"], f"{below} API key", r.status_code, r.text[:200]))
    assert not failures, failures
    print(f"{tried} role checks on {len(protected(routes))} routes")


def test_the_needed_role_alone_is_enough_to_read(auth_server, routes, idp):
    """GET routes with only their role pass the checks (whatever the route then answers)."""
    checked = 0
    for route in protected(routes):
        if route["method"] != "GET" or route["path"].startswith(("/proxy/", "/logs/gpu")):
            continue  # the DICOMweb proxy and nvidia-smi reach outside the server
        role = needed_role(route)
        with call(auth_server, "GET", route["path"], bearer(idp.token(roles=(role,) if role else ())), True) as r:
            assert r.status_code not in (401, 403), (route, r.status_code, r.text[:200])  # (model download: unread)
        checked += 1
    assert checked >= 12


def test_odd_tokens_are_refused_not_crashed_on(auth_server, idp):
    nameless = idp.token(preferred_username=None, sub=None)
    assert call(auth_server, "GET", "/info/", bearer(nameless)).status_code == 401
    by_subject = idp.token(preferred_username=None)  # Keycloak service accounts: the subject names the user
    r = call(auth_server, "GET", "/auth/token/valid", bearer(by_subject))
    assert r.status_code == 200 and r.json()["roles"] == list(ALL_ROLES)
    assert call(auth_server, "GET", "/info/", {"Authorization": "Bearer "}).status_code == 401


def test_valid_tokens_infer_and_save_a_label(auth_server, idp):
    user, annotator = bearer(idp.token(roles=(USER,))), bearer(idp.token(roles=(USER, ANNOTATOR)))
    info = call(auth_server, "GET", "/info/", user)
    assert info.status_code == 200 and set(info.json()["models"]) >= {"medsam2_2d", "medsam2_3d"}

    params = {"label": "lesion", "roi": [26, 46, 22, 42, 6, 6], "slice": 6, "client_id": "reader-1"}
    r = requests.post(
        auth_server.url + "/infer/medsam2_2d?image=ct_blob&output=image",
        data={"params": json.dumps(params)},
        headers=user,
        timeout=300,
    )
    assert r.status_code == 200, r.text[:500]
    answer = auth_server.studies.parent / "auth_answer.nii.gz"
    answer.write_bytes(r.content)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(answer)))
    assert label.shape == (12, 64, 72) and set(np.nonzero(label)[0].tolist()) <= {6}

    saved = auth_server.studies / "labels" / "final" / "ct_blob.nii.gz"
    url = auth_server.url + "/datastore/label?image=ct_blob&tag=final"
    with open(answer, "rb") as f:
        refused = requests.put(url, files={"label": ("label.nii.gz", f)}, headers=user, timeout=60)
    assert refused.status_code == 403 and ANNOTATOR in refused.text and not saved.exists()
    with open(answer, "rb") as f:
        accepted = requests.put(url, files={"label": ("label.nii.gz", f)}, headers=annotator, timeout=60)
    assert accepted.status_code == 200, accepted.text
    assert saved.exists()


def test_slicer_login_flow(auth_server, idp):
    """What the 3D Slicer plugin does: ask /auth/, log in at /auth/token (forwarded to the identity provider
    with MONAI_LABEL_AUTH_CLIENT_ID), check /auth/token/valid, send the token."""
    about = call(auth_server, "GET", "/auth/").json()
    assert about == {"enabled": True, "client_id": CLIENT_ID, "realm": idp.realm_uri}
    login = requests.post(
        auth_server.url + "/auth/token",
        data={"username": "alice", "password": PASSWORDS["alice"], "grant_type": "password"},
        timeout=30,
    )
    assert login.status_code == 200, login.text
    assert idp.grants[-1] == {"client_id": CLIENT_ID, "username": "alice", "grant_type": "password"}
    token = login.json()["access_token"]
    valid = call(auth_server, "GET", "/auth/token/valid", bearer(token)).json()
    assert valid["username"] == "alice" and set(valid["roles"]) == {USER, ANNOTATOR}
    assert call(auth_server, "GET", "/info/", bearer(token)).status_code == 200
    wrong = requests.post(auth_server.url + "/auth/token", data={"username": "alice", "password": "guess"}, timeout=30)
    assert wrong.status_code == 401 and "refused" in wrong.json()["detail"]


def test_tokens_never_reach_the_server_log(auth_server, idp):
    assert call(auth_server, "GET", "/info/", bearer(idp.token(roles=(USER,)))).status_code == 200
    log = auth_server.log.read_text()
    assert "401 GET /info/" in log  # refusals are logged (without the token)
    assert len(idp.issued) > 10
    leaked = [t for t in idp.issued if t in log or t.split(".")[2] in log]
    assert not leaked
    assert "Bearer ey" not in log and "correct horse" not in log


def test_reload_needs_an_admin_and_the_app_stays_guarded(auth_server, idp):
    assert call(auth_server, "POST", "/reload").status_code == 401
    assert call(auth_server, "POST", "/reload", bearer(idp.token(roles=(USER, ANNOTATOR, REVIEWER)))).status_code == 403
    assert call(auth_server, "POST", "/reload", bearer(idp.token(roles=(ADMIN,)))).status_code == 200
    # the app is re-created on the next request: access control is installed again, once
    assert call(auth_server, "GET", "/info/", bearer(idp.token(roles=(USER,)))).status_code == 200
    assert call(auth_server, "GET", "/info/").status_code == 401
    assert call(auth_server, "GET", "/info/", bearer(idp.token(roles=(ADMIN,)))).status_code == 403


def test_public_paths_and_roles_follow_the_api_prefix():
    roles = Roles()
    assert is_public("/ohif/index.html") and is_public("/ohif/medsam2", method="HEAD")
    assert not is_public("/ohif/index.html", method="POST") and not is_public("/ohif/../info/")
    assert is_public("/api/auth/token", "/api") and not is_public("/auth/token", "/api")
    assert is_public("/static/ohif/index.html") and not is_public("/static/../info/")
    assert not is_public("/auth/token/valid") and not is_public("/reload")
    assert required_roles("PUT", "/api/model/medsam2", roles, "/api") == (roles.admin,)
    assert required_roles("GET", "/api/model/medsam2", roles, "/api") == roles.all()  # MONAI Label: admin
    assert required_roles("GET", "/auth/token/valid", roles) == ()


def test_the_logs_need_an_admin():
    """The server log (and nvidia-smi) below /logs: admin only for any method, whatever MONAI Label checks."""
    roles = Roles()
    for method, path, prefix in [
        ("GET", "/logs/", ""),
        ("GET", "/logs", ""),
        ("GET", "/logs/gpu", ""),
        ("HEAD", "/logs/", ""),
        ("POST", "/logs/x/y", ""),
        ("GET", "/api/logs/", "/api"),
    ]:
        assert required_roles(method, path, roles, prefix) == (roles.admin,), (method, path)
    assert required_roles("GET", "/logs/", roles, "/api") == roles.all()  # outside the API prefix: no route
    assert required_roles("GET", "/logsx", roles) == roles.all()
    assert required_roles("GET", "/info/logs/", roles) == roles.all()


def test_the_logs_are_served_to_admins_only(auth_server, idp):
    annotator = bearer(idp.token(roles=(USER, ANNOTATOR, REVIEWER)))
    refused = call(auth_server, "GET", "/logs/?lines=10&text=true", annotator)
    assert refused.status_code == 403 and ADMIN in refused.text
    served = call(auth_server, "GET", "/logs/?lines=10&text=true", bearer(idp.token(roles=(ADMIN,))))
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/plain")


def test_user_fields_from_claims():
    names = ClaimNames(roles="resource_access#monailabel-app#roles")
    claims = {"sub": "u-1", "resource_access": {"monailabel-app": {"roles": ["monailabel-user", 7]}}}
    assert user_fields(claims, names) == {"username": "u-1", "email": None, "name": None, "roles": ["monailabel-user"]}
    assert user_fields({"sub": "u-1", "resource_access": {"monailabel-app": {"roles": "admin"}}}, names)["roles"] == []
    with pytest.raises(Refused, match="names no user") as refused:
        user_fields({"email": "a@b.example"}, ClaimNames())
    assert refused.value.status == 401


def test_an_unreachable_identity_provider_is_named_in_a_503():
    realm = f"http://127.0.0.1:{free_port()}/realms/nowhere"  # nothing listens there
    with pytest.raises(Refused, match="MONAI_LABEL_AUTH_REALM_URI") as refused:
        IdentityProvider(realm, timeout_s=2).document()
    assert refused.value.status == 503 and realm in refused.value.detail


def test_health_is_open_and_metrics_need_a_token(auth_server, idp):
    """Load balancers probe /health/* without credentials; /metrics is a route like the others."""
    for path in ("/health/live", "/health/ready"):
        r = call(auth_server, "GET", path)
        assert r.status_code in (200, 503) and r.json()["replica"], (path, r.text)
    assert call(auth_server, "GET", "/metrics").status_code == 401
    r = call(auth_server, "GET", "/metrics", bearer(idp.token(roles=["monailabel-user"])))
    assert r.status_code == 200 and "medsam2_requests_total" in r.text
    assert 'status="401"' in r.text  # refusals are counted too


def test_refusals_say_what_is_wrong(auth_server, idp):
    """Wrong issuer, wrong audience, expired, unknown key id, missing header, revoked or unknown API key: 401 with
    a detail that says which (the OHIF panel shows it as is, docs/api.md)."""
    cases = {
        "not issued by": bearer(idp.token(iss="https://login.other.example/realms/x")),
        f"audience ('aud') must include '{CLIENT_ID}'": bearer(idp.token(aud="another-app")),
        "has expired": bearer(idp.token(expires_in=-120)),
        "not signed by a key of the identity provider": bearer(idp.token(kid="unknown-key")),
        "Not authenticated": {},
        "was revoked": {"X-API-Key": auth_server.revoked_key},
        "not known to this server": {"X-API-Key": "msk_nope"},
    }
    for expected, headers in cases.items():
        r = call(auth_server, "GET", "/info/", headers)
        assert r.status_code == 401 and expected in r.json()["detail"], (expected, r.status_code, r.text)
    key_without_role = call(auth_server, "POST", "/reload", {"X-API-Key": auth_server.keys["annotator"]})
    assert key_without_role.status_code == 403 and ADMIN in key_without_role.json()["detail"]


def test_api_keys_serve_scripts_and_are_revoked_without_a_restart(auth_server, tmp_path):
    """An annotator key reads, infers and saves; revoked with scripts/api_keys.py, the next request is refused."""
    entry, key = add_key(auth_server.keys_file, "slicer-ws3", "annotator")
    headers = {"X-API-Key": key}
    assert call(auth_server, "GET", "/info/", headers).status_code == 200
    valid = call(auth_server, "GET", "/auth/token/valid", headers).json()
    assert valid["username"] == "api-key:slicer-ws3" and set(valid["roles"]) == {USER, ANNOTATOR}
    # the same key as the bearer token: what OHIF's DICOMweb client sends to the proxy (docs/security.md)
    as_bearer = call(auth_server, "GET", "/auth/token/valid", bearer(key)).json()
    assert as_bearer["username"] == "api-key:slicer-ws3"
    params = {"label": "lesion", "roi": [26, 46, 22, 42, 6, 6], "slice": 6, "client_id": "script-1"}
    r = requests.post(
        auth_server.url + "/infer/medsam2_2d?image=ct_blob&output=image",
        data={"params": json.dumps(params)},
        headers=headers,
        timeout=300,
    )
    assert r.status_code == 200, r.text[:300]
    answer = tmp_path / "answer.nii.gz"
    answer.write_bytes(r.content)
    with open(answer, "rb") as f:
        saved = requests.put(
            auth_server.url + "/datastore/label?image=ct_blob&tag=apikey",
            files={"label": ("label.nii.gz", f)},
            headers=headers,
            timeout=60,
        )
    assert saved.status_code == 200, saved.text
    beat = requests.post(auth_server.url + "/medsam2/heartbeat", json={"image": "ct_blob"}, headers=headers, timeout=30)
    assert beat.status_code == 204, beat.text  # docs/api.md
    bad_beat = requests.post(auth_server.url + "/medsam2/heartbeat", json={"img": 1}, headers=headers, timeout=30)
    assert bad_beat.status_code == 422 and "image" in bad_beat.json()["detail"]
    script = [sys.executable, "scripts/api_keys.py", "--file", str(auth_server.keys_file)]
    listed = subprocess.run([*script, "list"], capture_output=True, text=True, check=True, timeout=60)
    assert entry.id in listed.stdout and key not in listed.stdout and key not in auth_server.keys_file.read_text()
    subprocess.run([*script, "revoke", entry.id], capture_output=True, text=True, check=True, timeout=60)
    refused = call(auth_server, "GET", "/info/", headers)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    refused = call(auth_server, "GET", "/info/", bearer(key))
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert key not in auth_server.log.read_text()


def test_a_rotated_signing_key_is_picked_up_without_a_restart(auth_server, idp):
    old_key = idp.key
    try:
        idp.retired = [(old_key, KID)]  # providers keep publishing the old key for a while
        idp.key, idp.kid = rsa.generate_private_key(public_exponent=65537, key_size=2048), "realm-key-2"
        fresh = bearer(idp.token(roles=(USER,)))
        deadline = time.monotonic() + KEYS_COOLDOWN_S + 5  # the server fetches keys at most once per cooldown
        while (status := call(auth_server, "GET", "/info/", fresh).status_code) != 200 and time.monotonic() < deadline:
            time.sleep(1)
        assert status == 200
    finally:
        idp.key, idp.kid, idp.retired = old_key, KID, []


def test_the_key_file_is_reread_and_a_broken_one_refuses_every_key(tmp_path):
    path = tmp_path / "keys.json"
    store = ApiKeyStore(path)
    entry, key = add_key(path, "cli", "user")
    assert store.check(key).id == entry.id
    path.write_text("{not json")
    with pytest.raises(Refused, match="key file is broken") as broken:
        store.check(key)
    assert broken.value.status == 503
    path.write_text(json.dumps({"keys": []}))
    with pytest.raises(Refused, match="not known") as unknown:
        store.check(key)
    assert unknown.value.status == 401
