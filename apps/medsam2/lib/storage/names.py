"""What a datastore id or label tag may look like: ids name entries of the datastore, never paths."""

from __future__ import annotations

import re

SAFE_LABEL_TAG = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_path_like(text: str) -> bool:
    """An id that would name a file or folder outside the place it is looked up in."""
    return "/" in text or "\\" in text or "\x00" in text or text in (".", "..")
