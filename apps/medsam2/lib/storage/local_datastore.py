"""MONAI Label's LocalDatastore, made crash-safe: an acknowledged label survives a kill of the server.

MONAI Label 0.8.5 copies a label over its file (``shutil.copy``) and rewrites ``datastore_v2.json`` in place
(``open(path, "w")``). A process killed inside either write leaves a truncated file: a truncated label (also
when it overwrites a label saved earlier), or a truncated index, with which the server does not start again
(pydantic cannot parse it). Here both go through :func:`lib.atomic_files.atomic_write` (temporary file,
fsync, rename), a start removes the temporary files of killed writes, and an unreadable index found at start
(e.g. left by a MONAI Label without this fix) is moved aside and rebuilt from the files instead of stopping
the server.

Several server processes (replicas, see docs/scale_out.md) may share one datastore folder. Each keeps the index
in memory; here every access to it first checks the index file (one ``stat``) and reads it again when another
process replaced it, and every write re-reads it under the datastore's file lock before changing it. So no
process writes back an index that lacks another process's label, and each sees the others' labels at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from lib.atomic_files import atomic_write, remove_stale_temp_files
from lib.errors import BadRequest
from lib.imaging.cine_io import VIDEO_SUFFIXES, is_multiframe_dicom
from lib.storage.label_catalog import NAMES_KEY, VERSION_KEY, VERSION_TAG, LabelNames, names_in_label
from lib.storage.names import SAFE_LABEL_TAG, is_path_like

logger = logging.getLogger(__name__)


def check_writable_names(image_id: str, label_tag: str | None = None) -> None:
    """Refuse (400) image ids and label tags that would name a file or folder outside the datastore."""
    if not image_id or is_path_like(image_id) or image_id.startswith("."):
        raise BadRequest(f"Image ids are plain names, not paths: {image_id[:200]!r}.")
    if label_tag is not None and not SAFE_LABEL_TAG.match(label_tag):
        raise BadRequest(
            f"The label tag must be letters, digits, '-' or '_' (such as 'final'), got {label_tag[:200]!r}.",
        )


# The MONAI Label internals the subclasses below override or call are declared with the others in
# lib/server/patches.py (MONAILABEL_INTERNALS) and checked at server start, so an upgrade that renames one is
# reported instead of silently writing unsafely.


def _index_stamp(path: str) -> tuple[int, int] | None:
    """What changes when any process replaces the index file (a rename gives it a new inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class DurableLocalDatastore(LocalDatastore):
    """LocalDatastore whose label, image and index writes are atomic and durable, and whose index stays current
    when other processes write to the same folder (see the module docstring).

    Saving a label over one saved earlier under the same tag keeps the earlier one as the tag ``<tag>-v<N>``
    (its version N; the new one is N+1): nothing saved is lost, and a viewer can refine any version
    (:mod:`lib.storage.label_catalog`). ``keep_label_versions`` False: replaced in place (the PACS keeps them)."""

    keep_label_versions = True
    names_store: LabelNames | None = None  # set by lib.storage.datastores: the label names of each image

    def __init__(self, datastore_path: str, *args: Any, read_only: bool = False, **kwargs: Any):
        self._durable_read_only = read_only
        # held while the index object is swapped for a newer one, and by a writer from its read to its write,
        # so no thread of this process writes back an index another thread just replaced
        self.__dict__["_index_guard"] = threading.RLock()
        super().__init__(datastore_path, *args, read_only=read_only, **kwargs)
        if not read_only:
            self.remove_unfinished_writes()

    @property
    def _datastore(self) -> LocalDatastoreModel:
        """The index, read again first if another process replaced its file since this one last read or wrote it."""
        path = self.__dict__.get("_datastore_config_path")
        if path is not None and self.__dict__.get("_index_stamp") != _index_stamp(path):
            with self.__dict__["_index_guard"]:
                if self.__dict__.get("_index_stamp") != _index_stamp(path):
                    self._read_index_file(path)
        return self.__dict__["_index"]

    @_datastore.setter
    def _datastore(self, index: LocalDatastoreModel) -> None:
        self.__dict__["_index"] = index
        path = self.__dict__.get("_datastore_config_path")
        if path is not None:
            self.__dict__["_index_stamp"] = _index_stamp(path)

    def _read_index_file(self, path: str) -> None:
        stamp = _index_stamp(path)
        try:
            index = LocalDatastoreModel.model_validate_json(Path(path).read_text())
        except (OSError, ValueError):  # replaced again while read, or unreadable: the start-up check reports it
            return
        index.base_path = self._datastore_path
        self.__dict__["_index"], self.__dict__["_index_stamp"] = index, stamp

    def remove_unfinished_writes(self) -> list[Path]:
        """Delete the temporary files of writes that a killed process left (index, images, labels)."""
        labels_root = Path(self._datastore.label_path(None))
        folders = {Path(self._datastore_path), Path(self._datastore.image_path()), labels_root}
        folders.update(p for p in labels_root.iterdir() if p.is_dir())
        with FileLock(self._lock_file):  # every writer holds it while its temporary file exists
            return [tmp for folder in sorted(folders) for tmp in remove_stale_temp_files(folder)]

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        if not throw_exception or self._durable_read_only:
            return super()._init_from_datastore_file(throw_exception)
        try:  # at start
            super()._init_from_datastore_file(throw_exception=True)
        except ValueError as e:
            aside = f"{self._datastore_config_path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
            with FileLock(self._lock_file):
                os.replace(self._datastore_config_path, aside)
            logger.error(
                "Datastore index %s cannot be read (%s: %.200s); moved it to %s and rebuilt the index from the "
                "image and label files (label details saved with them, such as the user, are in the moved file).",
                self._datastore_config_path,
                type(e).__name__,
                e,
                aside,
            )

    def _update_datastore_file(self, lock: bool = True) -> None:
        self._write_index(lock)

    @contextmanager
    def index_write_lock(self) -> Iterator[None]:
        """Held from reading the index to writing it back: other processes (the file lock) and this process's
        other threads (the index guard) wait."""
        with FileLock(self._lock_file), self.__dict__["_index_guard"]:
            yield

    def _write_index(self, lock: bool = True, pause_at: str | None = None) -> None:
        if lock:
            with self.index_write_lock():
                return self._write_index(False, pause_at)
        text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
        # a rename, unlike LocalDatastore's rewrite, sends the file watcher no "modified" event to ignore
        with atomic_write(self._datastore_config_path, pause_at=pause_at) as tmp:
            Path(tmp).write_text(text)
        self._config_ts = os.stat(self._datastore_config_path).st_mtime
        self.__dict__["_index_stamp"] = _index_stamp(self._datastore_config_path)

    def reload_index_locked(self) -> None:
        """Read the index again if another process rewrote it; the caller holds the datastore's file lock."""
        _ = self._datastore  # the property reads the file again when it changed

    def save_label(
        self,
        image_id: str,
        label_filename: str,
        label_tag: str,
        label_info: dict[str, Any],
        only_if: Callable[[dict[str, Any] | None], bool] | None = None,
    ) -> str:
        """Save (or replace) the label of ``image_id`` under ``label_tag``; returns the label id (the image id).

        ``only_if``: called under the lock with the label's current info (as any process last wrote it); when
        it answers False nothing is written and '' is returned (a newer save won the race)."""
        check_writable_names(image_id, label_tag)
        logger.info(f"Saving Label for Image: {image_id}; Tag: {label_tag}; Info: {label_info}")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        with self.index_write_lock():
            # looked up under the lock, in the index as any process last wrote it
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            current = obj.labels.get(label_tag)
            if only_if is not None and not only_if(current.info if current else None):
                return ""
            version = self._keep_earlier_version(image_id, obj, label_tag) + 1
            os.makedirs(label_path, exist_ok=True)
            with atomic_write(os.path.join(label_path, name), pause_at="label_save_before_label_replace") as tmp:
                shutil.copyfile(label_filename, tmp)
            info = {**(label_info or {}), "ts": int(time.time()), "name": name, VERSION_KEY: version}
            if self.names_store is not None:
                info[NAMES_KEY] = names_in_label(label_filename, self.names_store.of_image(image_id))
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._write_index(lock=False, pause_at="label_save_before_index_replace")
        return image_id

    def keep_label_names(self, start_names: dict[str, int]) -> None:
        """Keep the names annotators add to each image in this datastore's folder (:class:`LabelNames`)."""
        self.names_store = LabelNames(self._datastore_path, start_names)

    def saved_label_files(self, image_id: str) -> dict[str, tuple[dict[str, Any], str]]:
        """Label tag -> (its info, its file) for every label saved for ``image_id``."""
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            return {}
        return {
            tag: (
                dict(label.info),
                os.path.join(
                    self._datastore.label_path(tag), label.info.get("name") or self._filename(image_id, label.ext)
                ),
            )
            for tag, label in obj.labels.items()
        }

    def _keep_earlier_version(self, image_id: str, obj: ImageLabelModel, label_tag: str) -> int:
        """Copy the label saved under ``label_tag`` (if any) to the tag ``<tag>-v<its version>``; returns that
        version (0: none saved). The caller holds the index lock."""
        current = obj.labels.get(label_tag)
        if current is None or not self.keep_label_versions or VERSION_TAG.match(label_tag):
            return int(current.info.get(VERSION_KEY, 1)) if current else 0
        version = int(current.info.get(VERSION_KEY, 1))
        name = current.info.get("name") or self._filename(image_id, current.ext)
        source = os.path.join(self._datastore.label_path(label_tag), name)
        if not os.path.isfile(source):
            return version
        older = f"{label_tag}-v{version}"
        os.makedirs(self._datastore.label_path(older), exist_ok=True)
        with atomic_write(os.path.join(self._datastore.label_path(older), name)) as tmp:
            shutil.copyfile(source, tmp)
        obj.labels[older] = DataModel(info={**current.info, VERSION_KEY: version}, ext=current.ext)
        return version

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Add (or replace) an image file; returns its id."""
        id_from_name, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or id_from_name
        check_writable_names(image_id)
        logger.info(f"Adding Image: {image_id} => {image_filename}")
        name = self._filename(image_id, image_ext)
        with self.index_write_lock():
            with atomic_write(os.path.realpath(os.path.join(self._datastore.image_path(), name))) as tmp:
                shutil.copyfile(image_filename, tmp)
            info = {**(image_info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._write_index(lock=False)
        return image_id

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """Merge ``info`` into the image's info (under the lock, in the current index)."""
        with self.index_write_lock():
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)
            self._write_index(lock=False)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        """Merge ``info`` into the label's info (under the lock, in the current index)."""
        with self.index_write_lock():
            label = self._datastore.label(label_id, label_tag)
            if not label:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            label.info.update(info)
            self._write_index(lock=False)


CINE_PATTERNS = [f"*{suffix}" for suffix in (".dcm", *VIDEO_SUFFIXES)]


class CineLocalDatastore(DurableLocalDatastore):
    """MONAI Label's local datastore (crash-safe writes), also listing cine loops: multi-frame DICOM and video files.

    Single-frame ``.dcm`` files (e.g. the slices of a series) stay unlisted, as before.
    """

    def _list_files(self, path: str, patterns: list[str]) -> dict[str, str]:
        files = super()._list_files(path, patterns)
        return {
            name: file
            for name, file in files.items()
            if not name.lower().endswith(".dcm") or is_multiframe_dicom(os.path.join(path, file))
        }
