"""The label tag of the save being handled: MONAI Label calls the app's ``on_save_label(image, label_id)`` without
it, and auto-retrain counts final labels only. The wrapper notes it for the thread that handles the save."""

from __future__ import annotations

import functools
import threading

_current = threading.local()


def install() -> None:
    """Wrap ``monailabel.endpoints.datastore.save_label`` (the route looks it up by name at call time)."""
    from monailabel.endpoints import datastore

    if getattr(datastore.save_label, "_medsam2_notes_tag", False):
        return
    save_label = datastore.save_label

    @functools.wraps(save_label)
    def save_label_noting_tag(background_tasks, image, params, tag, label, user=None):
        _current.tag = tag or "final"  # MONAI Label saves an empty tag as final
        try:
            return save_label(background_tasks, image, params, tag, label, user)
        finally:
            _current.tag = None

    save_label_noting_tag._medsam2_notes_tag = True  # type: ignore[attr-defined]
    datastore.save_label = save_label_noting_tag


def tag_being_saved() -> str | None:
    """The tag of the ``PUT /datastore/label`` this thread is handling, else None."""
    return getattr(_current, "tag", None)
