"""What ``GET /medsam2/labels/{image}`` answers (docs/api.md): the image's label names and every label saved for
it, newest first, each with the ``refine_from`` value that starts a refinement from it. Names and versions are
kept by :mod:`lib.storage.label_catalog` and the datastores."""

from __future__ import annotations

from typing import Any

from lib.errors import NotFound
from lib.storage.label_catalog import local_entry, newest_first
from lib.storage.local_datastore import DurableLocalDatastore, check_writable_names
from lib.storage.pacs_datastore import FINAL, PacsDatastore


def check_image(datastore: Any, image_id: str) -> None:
    """400 for an id that is a path, 404 for one the datastore does not list."""
    check_writable_names(image_id)
    if image_id not in datastore.list_images():
        raise NotFound(f"Image {image_id[:200]!r} is not in the datastore: GET /datastore/?output=all lists them.")


def image_labels(datastore: Any, image_id: str) -> dict[str, Any]:
    """``{"image", "names", "saved"}`` for one image of ``datastore``."""
    check_image(datastore, image_id)
    store = getattr(datastore, "names_store", None)
    names = store.of_image(image_id) if store is not None else {}
    return {"image": image_id, "names": list(names), "saved": saved_labels(datastore, image_id, names)}


def add_name(datastore: Any, image_id: str, name: Any) -> dict[str, Any]:
    """Keep ``name`` for the image (422 for a name a SEG or a PACS refuses); the same answer as a GET."""
    check_image(datastore, image_id)
    store = getattr(datastore, "names_store", None)
    if store is None:
        raise NotFound("This datastore keeps no label names (a local folder or a DICOMweb PACS does).")
    store.add(image_id, name)
    return image_labels(datastore, image_id)


def saved_labels(datastore: Any, image_id: str, names: dict[str, int]) -> list[dict[str, Any]]:
    """Every saved label of the image: local tags and their older versions, and next to a PACS its SEG series
    (a local final label that has reached the PACS is listed once, as its SEG)."""
    entries: list[dict[str, Any]] = []
    if isinstance(datastore, DurableLocalDatastore):
        pacs = isinstance(datastore, PacsDatastore)
        for tag, (info, path) in datastore.saved_label_files(image_id).items():
            if pacs and tag == FINAL and info.get("pacs_upload", {}).get("status", "sent") == "sent":
                continue
            entries.append(local_entry(tag, info, path, names))
        if pacs:
            entries += datastore.segs_of(image_id)
    return newest_first(entries)
