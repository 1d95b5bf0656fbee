"""Extract members of a downloaded tar archive without letting one leave the target folder.

Python's ``filter="data"`` does that from 3.12 (backported to 3.11.4): Debian 12's python3.11 is 3.11.2, where the
same checks are made here instead (regular files and folders only, relative names without ``..``)."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath


class UnsafeMember(ValueError):
    """A member that is a link or a device, or whose name leaves the target folder."""


def safe_extract(tar: tarfile.TarFile, into: Path | str, members: Sequence[tarfile.TarInfo]) -> None:
    """Extract ``members`` of ``tar`` into ``into``."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(into, members=members, filter="data")
        return
    for member in members:
        name = PurePosixPath(member.name)
        if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts:
            raise UnsafeMember(f"{member.name}: not a plain file or folder inside the archive's root")
        member.mode &= 0o755  # no set-id bits, as the data filter does
    tar.extractall(into, members=members)
