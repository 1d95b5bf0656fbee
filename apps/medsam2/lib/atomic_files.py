"""Crash-safe file and folder replacement: a file (or folder) is either its old or its new content, never a
truncated mix. The one place the app writes files atomically.

A writer fills a temporary file (:func:`atomic_write`, :func:`write_json_atomic`) or folder
(:func:`atomic_folder`) next to the target (``.<name>.<random>.part``), flushes it to disk, renames it over the
target and flushes the folder; a killed writer leaves only the temporary file or folder, which
:func:`remove_stale_temp_files` deletes (on the next start, or after a failed run). While it exists the
temporary file or folder holds an exclusive ``flock``, which the kernel drops when the writer dies, so a cleanup
never deletes what a writer that is still alive is writing.

No MONAI Label imports: used by the datastores, the checkpoint writer, the trainer and the tests.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".part"

# Test hook, off unless set: "<point>" or "<point>#<n>" makes the process write the file named by
# MEDSAM2_TEST_PAUSE_MARKER and sleep for good the first (n-th) time it reaches the named pause_point(), so that
# a crash test can SIGKILL it exactly there. Points: label_save_before_label_replace,
# label_save_before_index_replace, checkpoint_publish_before_replace.
PAUSE_AT_ENV = "MEDSAM2_TEST_PAUSE_AT"
PAUSE_MARKER_ENV = "MEDSAM2_TEST_PAUSE_MARKER"
_pause_hits: dict[str, int] = {}

_UMASK = os.umask(0o022)
os.umask(_UMASK)
# what tempfile.mkstemp/mkdtemp names look like: "." + target name + "." + 8 random characters + ".part"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


def pause_point(name: str) -> None:
    """Crash-test hook: pause here for good if ``MEDSAM2_TEST_PAUSE_AT`` names this point (see above)."""
    wanted = os.environ.get(PAUSE_AT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _pause_hits[name] = _pause_hits.get(name, 0) + 1
    if _pause_hits[name] != int(nth or 1):
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    logger.warning("%s=%s: pausing process %d at %s", PAUSE_AT_ENV, wanted, os.getpid(), name)
    if marker:
        Path(marker).write_text(f"{name} {os.getpid()}\n")
    while True:
        time.sleep(3600)


def temp_pattern(path: Path) -> str:
    """Glob pattern of the temporary files that writes of ``path`` use."""
    return f".{path.name}.*{TEMP_SUFFIX}"


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: Path | str, pause_at: str | None = None) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; write it (by name) inside the block.

    On a normal exit the file is flushed to disk and renamed over ``path`` (then the folder is flushed);
    on an exception it is removed and ``path`` is untouched. ``pause_at`` names the crash-test pause point
    between the flush and the rename.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # keep the target's permissions (mkstemp makes 0600 files); new files as open() would make them
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        os.fchmod(fd, mode)
        yield tmp_name
        os.fsync(fd)  # fsync flushes the file (inode), whichever descriptor wrote it
        if pause_at:
            pause_point(pause_at)
        os.replace(tmp_name, path)
        fsync_dir(path.parent)
    finally:
        os.close(fd)
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def write_json_atomic(path: Path | str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` with :func:`atomic_write`, creating its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp_name, open(tmp_name, "w") as f:
        json.dump(data, f, indent=1, default=str)


@contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """Yield a new empty temporary folder next to ``path`` (its parent created if needed); fill it inside the block.

    On a normal exit every file in it and the folder itself are flushed to disk and it is renamed to ``path``
    (an existing ``path`` is replaced: a reader sees the old folder, for an instant none, or the new one, never
    part of one); on an exception it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.chmod(tmp, 0o777 & ~_UMASK)  # as os.makedirs would make it (mkdtemp makes 0700 folders)
        yield tmp
        _fsync_tree(tmp)
        _replace_folder(tmp, path)
        fsync_dir(path.parent)
    finally:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def _replace_folder(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; a non-empty ``path`` is first renamed aside (a rename cannot replace it)."""
    if not (path.is_dir() and not path.is_symlink() and any(path.iterdir())):
        os.replace(new, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    os.replace(path, aside)  # onto the empty folder just made
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)  # the old folder back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_temp_files(folder: Path | str, pattern: str = f".*{TEMP_SUFFIX}") -> list[Path]:
    """Delete the temporary files and folders (matching ``pattern``) that killed writers left in ``folder``;
    return them.

    Only names that :func:`atomic_write` and :func:`atomic_folder` make are considered, and those whose writer
    is alive (it holds their ``flock``) are left alone.
    """
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(pattern):
        if not _TEMP_NAME.match(tmp.name):
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:  # gone meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it
            os.close(fd)
            continue
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except OSError as e:  # e.g. a read-only folder: not worth refusing to start over
            logger.warning("Could not remove %s, left by a killed process: %s", tmp, e)
        finally:
            os.close(fd)
    if removed:
        logger.warning("Removed %d unfinished write(s) left by a killed process: %s", len(removed), removed)
    return removed
