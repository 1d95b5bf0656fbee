"""No patient identifiers in the server's log lines, and the request id in each line served for a request.

MONAI Label configures logging from its ``logging.json`` (handlers ``console``, ``file_handler``,
``task_console``, ``task_handler`` on the root logger, ``task_*`` and ``uvicorn*``) and writes e.g. every
"next sample" with the series' ``PatientID`` into ``logs/app.log``, which ``GET /logs/`` serves. :func:`install`
wraps the formatter of every handler of the root logger and of every logger with handlers of its own in a
:class:`PrivateFormatter`: the line is formatted as before (message, arguments, traceback), then the finished
text is scrubbed (:func:`lib.log_identifiers.scrub`) and, while a request is served, `` [req=<id>]`` is put
after the level name (``[INFO] [req=ab12...]``; at the start of lines whose format has no ``[LEVEL]``).

Pseudonyms are keyed by a random secret made once per installation: ``.log_pseudonym_key`` (mode 0600) in the
app's model folder, which replicas share, so the same patient has the same pseudonym on every replica and after
a restart. Where that file cannot be written, a key of this process is used (pseudonyms then differ per run).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from lib.log_identifiers import scrub, set_key
from lib.server.request_context import current_request_id

logger = logging.getLogger(__name__)

KEY_FILE = ".log_pseudonym_key"
KEY_BYTES = 32


class PrivateFormatter(logging.Formatter):
    """Formats with the handler's own formatter, then scrubs identifiers and adds the request id."""

    medsam2_private = True  # recognised by this attribute also when this module was loaded again

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return with_request_id(scrub(self.inner.format(record)), record.levelname)


def with_request_id(line: str, level: str) -> str:
    """``line`` with `` [req=<id>]`` after its ``[LEVEL]`` (else in front) while a request is served."""
    request_id = current_request_id()
    if not request_id:
        return line
    marker = f"[{level}]"
    if marker in line:
        return line.replace(marker, f"{marker} [req={request_id}]", 1)
    return f"[req={request_id}] {line}"


def installation_key(folder: str | os.PathLike | None) -> bytes | None:
    """The key in ``folder/.log_pseudonym_key``, made (mode 0600) if there is none; None if it cannot be."""
    if not folder:
        return None
    path = Path(folder) / KEY_FILE
    try:
        if not path.exists():
            _create_key_file(path)
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as e:
        logger.warning("Log pseudonyms: cannot use %s (%s); using a key of this process", path, type(e).__name__)
        return None
    return key if len(key) == KEY_BYTES else None


def _create_key_file(path: Path) -> None:
    """Written whole under a temporary name, then linked into place: replicas starting together agree on one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=KEY_FILE + ".")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:  # another replica made it first: use that one
            pass
    finally:
        os.unlink(temporary)


def _loggers_with_handlers() -> list[logging.Logger]:
    named = [x for x in list(logging.root.manager.loggerDict.values()) if isinstance(x, logging.Logger)]
    return [logging.root] + [x for x in named if x.handlers]


def _handlers() -> list[logging.Handler]:
    seen: dict[int, logging.Handler] = {}
    for each in _loggers_with_handlers():
        for handler in each.handlers:
            seen.setdefault(id(handler), handler)
    return list(seen.values())


def install(key_folder: str | os.PathLike | None) -> bool:
    """Wrap the formatter of every handler configured now; idempotent. Returns whether any handler exists."""
    key = installation_key(key_folder)
    if key is not None:  # else lib.log_identifiers keeps its key of this process
        set_key(key)
    handlers = _handlers()
    for handler in handlers:
        if not getattr(handler.formatter, "medsam2_private", False):
            handler.setFormatter(PrivateFormatter(handler.formatter))
    return bool(handlers)


def is_installed() -> bool:
    """Every handler of the root logger and of the loggers with their own handlers scrubs its lines."""
    handlers = _handlers()
    return bool(handlers) and all(getattr(h.formatter, "medsam2_private", False) for h in handlers)
