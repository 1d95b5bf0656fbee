"""Label names and saved labels per image (docs/api.md): what ``GET /medsam2/labels/{image}`` answers.

Names: the server's start labels (``--conf labels``) for every image, plus the names annotators add to an image.
Added names are kept on disk in the datastore's folder (``medsam2_label_names.json``, written atomically under a
file lock, so every client and every replica on that folder sees them) with one value per name across all images:
a name keeps the value it got first, and ``/info`` and the Slicer plugin's label list can show every name with one
value. A name must fit a DICOM SEG segment label and a PACS: letters, digits, space and ``_ - . ( )``, 1-64
characters (else 422).

Saved labels: every version of every label tag of the image, newest first. A local datastore keeps the older
versions of a tag as tags of their own (``final-v1``, ``final-v2``: see :meth:`DurableLocalDatastore.save_label`);
next to a PACS every save of a final label is a new DICOM SEG series and the old ones stay in the PACS
(``refine_from: "seg:<SeriesInstanceUID>"``).
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from filelock import FileLock

from lib.atomic_files import write_json_atomic
from lib.errors import Unprocessable

NAMES_FILE = "medsam2_label_names.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9 _\-.()]+$")
MAX_NAME_CHARS = 64
VERSION_TAG = re.compile(r"^(?P<tag>[A-Za-z0-9_-]+)-v(?P<version>[0-9]+)$")  # an older version of a tag
VERSION_KEY = "medsam2_version"  # a saved label's version number in its info (1 when absent)
NAMES_KEY = "medsam2_names"  # the label names a saved label holds, noted when it is saved
MAX_LISTED_VOXELS = 512 * 512 * 1200  # larger label files are not read to list their names


def check_label_name(name: Any) -> str:
    """The name, stripped, or :class:`Unprocessable` saying what a name may hold."""
    if not isinstance(name, str) or not name.strip():
        raise Unprocessable('Send a label name: {"name": "liver"} (letters, digits, space, _ - . ( ); 1-64 chars).')
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise Unprocessable(f"The label name has {len(name)} characters; a DICOM SEG segment label takes at most 64.")
    bad = sorted({c for c in name if not NAME_PATTERN.match(c)})
    if bad:
        shown = " ".join(repr(c) for c in bad[:10])
        raise Unprocessable(
            f"The label name {name[:64]!r} holds characters a DICOM SEG segment label or the PACS refuses: {shown}. "
            "Use letters, digits, space, _ - . ( )."
        )
    return name


class LabelNames:
    """The label names of each image (start names + added ones), kept in ``<folder>/medsam2_label_names.json``."""

    def __init__(self, folder: str | os.PathLike, start_names: dict[str, int]):
        self.path = Path(folder) / NAMES_FILE
        self.start_names = {str(k): int(v) for k, v in start_names.items()}
        self._lock = FileLock(str(self.path) + ".lock")

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"values": {}, "images": {}}
        except ValueError as e:
            detail = f"{self.path.name} in the datastore folder cannot be read ({e}); fix or remove it."
            raise Unprocessable(detail) from None
        return {"values": dict(data.get("values", {})), "images": dict(data.get("images", {}))}

    def added(self) -> dict[str, int]:
        """Every added name with its value (all images)."""
        return {k: int(v) for k, v in self._read()["values"].items() if k not in self.start_names}

    def added_by_image(self) -> dict[str, list[str]]:
        """Image id -> the names added to it, in the order they were added."""
        return {k: list(v) for k, v in self._read()["images"].items()}

    def of_image(self, image_id: str) -> dict[str, int]:
        """The names an annotator may use on ``image_id``: start names first, then those added to it."""
        data = self._read()
        names = dict(self.start_names)
        for name in data["images"].get(image_id, []):
            names.setdefault(name, int(data["values"][name]))
        return names

    def add(self, image_id: str, name: Any) -> dict[str, int]:
        """Add ``name`` to the image (a name known under another case is that name); returns the image's names."""
        name = check_label_name(name)
        with self._lock:
            data = self._read()
            known = {k.lower(): k for k in (*self.start_names, *data["values"])}
            name = known.get(name.lower(), name)
            if name not in self.start_names and name not in data["images"].get(image_id, []):
                if name not in data["values"]:
                    used = [*self.start_names.values(), *map(int, data["values"].values()), 0]
                    data["values"][name] = max(used) + 1
                data["images"].setdefault(image_id, []).append(name)
                write_json_atomic(self.path, data)
        return self.of_image(image_id)


def names_in_label(path: str, names: dict[str, int]) -> list[str]:
    """The label names a label file holds (values without a name as ``label <value>``; none when the file is not
    a readable image, or declares more than ``MAX_LISTED_VOXELS``: a forged header must not allocate gigabytes)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        if math.prod(reader.GetSize()) * reader.GetNumberOfComponents() > MAX_LISTED_VOXELS:
            return []
        values = np.unique(sitk.GetArrayFromImage(reader.Execute()))  # a view would outlive its image
    except RuntimeError:  # e.g. OHIF's raw .bin before conversion: its save reports what is wrong
        return []
    by_value = {v: k for k, v in names.items()}
    return [by_value.get(int(v), f"label {int(v)}") for v in values if v]


def iso_time(seconds: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds") if seconds else None


def local_entry(tag: str, info: dict[str, Any], path: str | None, names: dict[str, int]) -> dict[str, Any]:
    """One ``saved`` entry of a label kept in the local datastore under ``tag``."""
    older = VERSION_TAG.match(tag)
    held = info.get(NAMES_KEY)
    if held is None and path and os.path.isfile(path):
        held = names_in_label(path, names)
    return {
        "tag": older.group("tag") if older else tag,
        "version": int(older.group("version")) if older else int(info.get(VERSION_KEY, 1)),
        "source": "local",
        "refine_from": tag,
        "saved_at": iso_time(info.get("ts")),
        "names": list(held or []),
        "series_uid": info.get("SeriesInstanceUID"),
    }


def newest_first(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest save first: by time, then by version."""
    return sorted(entries, key=lambda e: (e.get("saved_at") or "", e.get("version", 0)), reverse=True)
