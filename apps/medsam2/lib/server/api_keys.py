"""API keys for scripts and the 3D Slicer plugin: sent as ``X-API-Key: <key>``, each with one role, revocable
without a restart.

The key file (``--conf api_keys_file``, JSON) holds, per key, its id, a name, its role and the SHA-256 of the key;
never the key itself. A key is 32 random bytes (``secrets.token_urlsafe``), so a plain SHA-256 is enough (there is
nothing to guess a password from). The server re-reads the file when it changes (its modification time, size or
inode), so a key added or revoked with ``scripts/api_keys.py`` counts from the next request, on every replica that
shares the file. A file that cannot be read refuses every API key (503) rather than keep a revoked one valid.

Roles nest for keys (a key has one role, and gets the ones below it): ``admin`` > ``reviewer`` > ``annotator`` >
``user``; an annotator key can read, infer and save labels. No web framework imported here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.atomic_files import write_json_atomic
from lib.errors import Refused

logger = logging.getLogger(__name__)

KEY_PREFIX = "msk_"  # medsam2 secret key: recognisable in a leaked log or a secret scanner
ROLE_ORDER = ("user", "annotator", "reviewer", "admin")  # each includes the ones before it
KEY_ID = re.compile(r"[a-f0-9]{12}")
NAME = re.compile(r"[A-Za-z0-9 ._@:-]{1,64}")


class ApiKeyFileError(ValueError):
    """The key file cannot be read or written; the message names it and what is wrong."""


def digest(key: str) -> str:
    """The SHA-256 (hex) stored for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def roles_of(role: str) -> tuple[str, ...]:
    """The short role names a key with ``role`` holds (its own and those below it)."""
    return ROLE_ORDER[: ROLE_ORDER.index(role) + 1]


@dataclass(frozen=True)
class ApiKey:
    """One entry of the key file."""

    id: str
    name: str
    role: str
    sha256: str
    created: str
    revoked: str | None = None

    @classmethod
    def from_json(cls, entry: Any) -> ApiKey:
        if not isinstance(entry, dict):
            raise ApiKeyFileError("each entry of 'keys' must be an object")
        try:
            key = cls(**{k: entry.get(k) for k in ("id", "name", "role", "sha256", "created", "revoked")})
        except TypeError as e:
            raise ApiKeyFileError(str(e)) from None
        if key.role not in ROLE_ORDER:
            raise ApiKeyFileError(f"key {key.id!r}: role must be one of {', '.join(ROLE_ORDER)}, got {key.role!r}")
        if not isinstance(key.sha256, str) or not re.fullmatch(r"[a-f0-9]{64}", key.sha256):
            raise ApiKeyFileError(f"key {key.id!r}: 'sha256' must be 64 hex digits")
        return key

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("id", "name", "role", "sha256", "created", "revoked")}


def read_keys(path: Path) -> list[ApiKey]:
    """The keys of the file at ``path`` (none when it does not exist); ApiKeyFileError when it is not valid."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ApiKeyFileError(f"{path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ApiKeyFileError(f"{path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ApiKeyFileError(f'{path} must hold {{"keys": [...]}}')
    return [ApiKey.from_json(entry) for entry in data["keys"]]


def write_keys(path: Path, keys: list[ApiKey]) -> None:
    """Replace the file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # created 0600: the atomic write keeps the target's mode
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
    write_json_atomic(path, {"keys": [k.as_json() for k in keys]})


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def add_key(path: Path, name: str, role: str) -> tuple[ApiKey, str]:
    """Add a key with ``role``; returns (its entry, the key itself: shown once, stored only as its hash)."""
    if role not in ROLE_ORDER:
        raise ApiKeyFileError(f"role must be one of {', '.join(ROLE_ORDER)}, got {role!r}")
    if not NAME.fullmatch(name):
        raise ApiKeyFileError("name must be 1 to 64 letters, digits, spaces or . _ @ : -")
    keys = read_keys(path)
    key_id = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    entry = ApiKey(key_id, name, role, digest(secret), _now())
    write_keys(path, [*keys, entry])
    return entry, secret


def revoke_key(path: Path, key_id: str) -> ApiKey:
    """Mark a key revoked (kept in the file, so the listing shows when); ApiKeyFileError for an unknown id."""
    keys = read_keys(path)
    found = [k for k in keys if k.id == key_id]
    if not found:
        raise ApiKeyFileError(f"no key with id {key_id!r} in {path}")
    revoked = ApiKey(**{**found[0].as_json(), "revoked": found[0].revoked or _now()})
    write_keys(path, [revoked if k.id == key_id else k for k in keys])
    return revoked


class ApiKeyStore:
    """The server's view of the key file, re-read when the file changes."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._by_digest: dict[str, ApiKey] = {}
        self._error: str | None = None

    def _file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp and self._stamp is not None:
            return
        try:
            keys = read_keys(self.path)
        except ApiKeyFileError as e:
            if self._error != str(e):
                logger.error("API keys refused until the key file is fixed: %s", e)
            self._error, self._by_digest, self._stamp = str(e), {}, None
            return
        self._error, self._stamp = None, stamp
        self._by_digest = {k.sha256: k for k in keys}
        logger.info("API keys read from %s: %d active", self.path, sum(k.revoked is None for k in keys))

    def check(self, key: str) -> ApiKey:
        """The entry of a valid, unrevoked key; :class:`Refused` 401 (unknown or revoked) or 503 (file unreadable)."""
        with self._lock:
            self._refresh()
            if self._error is not None:
                raise Refused(503, f"API keys cannot be checked: the key file is broken ({self._error}).")
            entry = self._by_digest.get(digest(key.strip()))
        if entry is None:
            raise Refused(401, "The API key is not known to this server: ask its administrator for one.")
        if entry.revoked is not None:
            raise Refused(401, f"The API key {entry.id} ({entry.name}) was revoked on {entry.revoked}.")
        return entry
