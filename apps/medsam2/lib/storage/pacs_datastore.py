"""MONAI Label's DICOMweb datastore, made fit to run next to a hospital PACS.

What MONAI Label 0.8.5's ``DICOMWebDatastore`` does, and what this changes:

- No timeout on any PACS request, and a PACS that is down turns into a 500 with a stack trace: here every
  request has a connect/read timeout (``--conf dicomweb_timeout_s``) and failures answer 503 with a message
  naming the PACS (:class:`PacsUnavailable`); ``/info`` keeps answering.
- A series download that is interrupted stays in the cache as a partial series, used from then on: here a
  series is downloaded into a temporary folder and renamed into place when complete
  (:func:`lib.atomic_files.atomic_folder`; the start removes those of killed downloads).
- The SEG is written with label names taken by list position and uploaded before the label is kept: if the
  upload fails the label is lost (500). Here the label is saved locally first, then sent; a failed upload keeps
  it, marks it ``pacs_upload: failed`` and answers 502 saying so; later saves and ``datalist`` send it again,
  and a label whose upload has not gone through is never removed to mirror the PACS.
- Several SEGs of one series (every save uploads one) are listed as several labels, and which one a cold
  cache reads is left to the PACS's answer order: here the newest SEG (SeriesDate/SeriesTime) is the label,
  and one read on another cache or after a restart is resampled onto the image's voxel grid.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pydicom
import pydicom.errors
import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.utils.convert import binary_to_image, dicom_to_nifti
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from lib.atomic_files import atomic_folder, atomic_write
from lib.errors import AppError, NotFound, PacsUnavailable, PacsUploadFailed, Unprocessable, UnsupportedMedia
from lib.imaging.dicom_seg import (
    SegError,
    label_on_image_grid,
    read_dicom_seg,
    referenced_series,
    seg_time_utc,
    segments_for,
    write_dicom_seg,
)
from lib.imaging.volume_io import describe_image_grid
from lib.log_identifiers import identifying_values, remember_identifiers
from lib.storage.label_catalog import VERSION_KEY, newest_first
from lib.storage.local_datastore import DurableLocalDatastore, check_writable_names

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
SEG_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
DEFAULT_TIMEOUT_S = 30.0


class TimeoutSession(requests.Session):
    """A requests session whose every request has a (connect, read) timeout unless the caller gives one."""

    def __init__(self, timeout_s: float, auth: requests.auth.AuthBase | tuple[str, str] | None = None):
        super().__init__()
        self.timeout_s = timeout_s
        if auth:
            self.auth = auth

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", (min(self.timeout_s, 10.0), self.timeout_s))
        try:
            return super().request(method, url, **kwargs)
        except requests.ConnectionError as e:
            # a read (GET, HEAD) that met a dropped keep-alive connection (Orthanc closes idle ones after 1 s) is
            # sent once more on a new connection; never after a timeout, never a write
            if isinstance(e, requests.Timeout) or str(method).upper() not in ("GET", "HEAD"):
                raise
            logger.info("PACS connection dropped (%s); %s sent again", type(e).__name__, method)
            return super().request(method, url, **kwargs)


PACS_TOKEN_ENV = "MEDSAM2_PACS_TOKEN"  # a bearer token for the PACS, where a file is not practical


class BearerToken(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` on every PACS request, the token read from a file (re-read when the file
    changes, so a job can renew a short-lived token without a restart) or given as text."""

    def __init__(self, token: str = "", token_file: str = ""):
        self.token_file = token_file
        self._token = token.strip()
        self._stamp: tuple | None = None
        self._lock = threading.Lock()

    def token(self) -> str:
        if not self.token_file:
            return self._token
        with self._lock:
            try:
                st = os.stat(self.token_file)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if stamp != self._stamp:
                    with open(self.token_file, encoding="utf-8") as f:
                        self._token, self._stamp = f.read().strip(), stamp
            except OSError as e:
                raise PacsUnavailable(
                    f"The PACS token file {self.token_file} (--conf pacs_token_file) cannot be read: "
                    f"{e.strerror or e}."
                ) from None
            if not self._token:
                raise PacsUnavailable(f"The PACS token file {self.token_file} (--conf pacs_token_file) is empty.")
            return self._token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        return request


def pacs_credentials(settings, token_file: str = "") -> requests.auth.AuthBase | tuple[str, str] | None:
    """How requests to the PACS authenticate: a bearer token (``--conf pacs_token_file``, else the
    ``MEDSAM2_PACS_TOKEN`` environment variable), else basic auth from MONAI Label's settings
    (DATASTORE_USERNAME/PASSWORD, else the older DICOMWEB_* names), else None."""
    if token_file:
        return BearerToken(token_file=token_file)
    if os.environ.get(PACS_TOKEN_ENV, "").strip():
        return BearerToken(token=os.environ[PACS_TOKEN_ENV])
    user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
    return (user, password) if user and password else None


REFUSED_CREDENTIALS = (401, 403)  # a PACS's answers to this server's own credentials (not a viewer's rights)


def credentials_refused(base_url: str, what: str, status: int) -> str:
    """One sentence for a PACS that refused this server's own credentials."""
    return (
        f"The PACS at {base_url} refused this server's credentials (HTTP {status}) while {what}: check the PACS "
        "token (--conf pacs_token_file, MEDSAM2_PACS_TOKEN) or MONAI_LABEL_DATASTORE_USERNAME/PASSWORD."
    )


def describe_failure(base_url: str, what: str, error: Exception, timeout_s: float) -> str:
    """One sentence an administrator can act on."""
    if isinstance(error, requests.Timeout):
        cause = f"it did not answer within {timeout_s:g} s (--conf dicomweb_timeout_s)"
    elif isinstance(error, requests.ConnectionError):
        cause = "it could not be reached (is it running, and is the address right?)"
    elif isinstance(error, requests.HTTPError) and error.response is not None:
        if error.response.status_code in REFUSED_CREDENTIALS:
            return credentials_refused(base_url, what, error.response.status_code)
        cause = f"it answered HTTP {error.response.status_code}"
    else:
        cause = f"{type(error).__name__}: {str(error)[:200]}"
    return f"The PACS at {base_url} failed while {what}: {cause}. Retry when the PACS is back."


class PacsDatastore(DICOMWebDatastore, DurableLocalDatastore):
    """DICOMweb images and DICOM SEG final labels, with a crash-safe local cache (see the module docstring)."""

    def __init__(
        self,
        client: DICOMwebClient,
        search_filter: dict[str, Any],
        cache_path: str | None,
        label_names: dict[str, int],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        fetch_by_frame: bool = False,
        resend_every_s: float = 0.0,
    ):
        self.timeout_s = timeout_s
        # dicomweb-client retries a failed request up to 5 times with back-off (~50 s at a 4 s timeout): one
        # try, so a request fails within the configured timeout; the viewers and the resend thread retry.
        client.set_http_retry_params(retry=False)
        self._send_lock = threading.Lock()
        self.label_names = dict(label_names)
        self._series_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._seg_view: tuple[float, dict[str, dict[str, str]]] | None = None
        self._seg_sources: dict[str, tuple[str, str]] = {}  # SEG uid -> (image series uid, UTC time): fixed
        self._seg_names: dict[str, list[str]] = {}  # SEG uid -> its segments' labels: fixed
        self._all_segs: set[str] = set()
        self._known_images: list[str] = []
        self._last_failure: str | None = None
        self._reachability: tuple[float, str | None] | None = None  # (when checked, why unreachable)
        self.unreadable_segs: dict[str, str] = {}  # SEG series uid -> why it was left out
        # DurableLocalDatastore's start also removes the temporary folders of downloads a killed server left
        super().__init__(client, search_filter, cache_path, fetch_by_frame=fetch_by_frame, convert_to_nifti=True)
        if resend_every_s > 0:
            threading.Thread(target=self._resend_loop, args=(resend_every_s,), daemon=True, name="pacs-resend").start()

    def _resend_loop(self, every_s: float) -> None:
        """Keep ``/info``'s view of the PACS fresh, and send labels whose upload failed (PACS down) once the
        PACS is back, without waiting for a user."""
        while True:
            try:
                self.list_images()
                self.latest_segs(max_age_s=0)
                if self._unsent():
                    still = self.send_unsent_labels()
                    logger.info("Labels not yet in the PACS: %d", len(still))
            except Exception as e:  # never let the thread die: next round tries again
                logger.warning("PACS refresh failed: %s", e)
            time.sleep(every_s)

    # ----- calls to the PACS --------------------------------------------------------------------------------
    def _pacs(self, what: str, call, *args, cached: bool = False, **kwargs):
        """Call the PACS; failures become :class:`PacsUnavailable` (503) or 404. ``cached``: the call may be
        answered from a cache, so its success says nothing about the PACS now."""
        try:
            result = call(*args, **kwargs)
        except (requests.RequestException, pydicom.errors.InvalidDicomError) as e:
            code = e.response.status_code if isinstance(e, requests.HTTPError) and e.response is not None else 0
            if code == 404:
                raise NotFound(f"Not found in the PACS while {what}.") from None
            if isinstance(e, pydicom.errors.InvalidDicomError):
                message = f"The PACS at {self._client.base_url} sent something that is not DICOM while {what}."
            elif code in (401, 403):
                message = (
                    f"The PACS at {self._client.base_url} refused access (HTTP {code}) while {what}: check "
                    "MONAI_LABEL_DATASTORE_USERNAME / MONAI_LABEL_DATASTORE_PASSWORD and the PACS's permissions."
                )
            else:
                message = describe_failure(self._client.base_url, what, e, self.timeout_s)
            logger.error(message)
            self._last_failure = message
            raise PacsUnavailable(message) from None
        if not cached:
            self._last_failure = None
        return result

    def _series_lock(self, series_uid: str) -> threading.Lock:
        with self._locks_guard:
            return self._series_locks.setdefault(series_uid, threading.Lock())

    def list_images(self) -> list[str]:
        self._known_images = self._pacs("listing the image series", super().list_images, cached=True)
        return self._known_images

    def knows_image(self, image_id: str) -> bool:
        """Whether ``image_id`` is an image series of the last listing (not a SEG, not unknown)."""
        return image_id in self._known_images

    def _dicom_info(self, series_id):
        try:
            info = self._pacs(f"looking up series {series_id}", super()._dicom_info, series_id)
        except IndexError:  # the search found nothing: keep what is known
            return {"SeriesInstanceUID": series_id}
        remember_identifiers(identifying_values(info))  # never in a log line from now on
        return info

    def _download_series(self, series_uid: str, target: str) -> None:
        """Download a series into ``target`` all at once: a temporary folder renamed when complete."""
        if os.path.isdir(target) and os.listdir(target):
            return
        with atomic_folder(target) as partial:
            self._pacs(
                f"sending series {series_uid}",
                _download,
                series_uid,
                str(partial),
                self._client,
                self._fetch_by_frame,
            )
            if not os.listdir(partial):
                raise NotFound(f"The PACS has no instances in series {series_uid}.")
            _remember_patient(os.path.join(partial, sorted(os.listdir(partial))[0]))

    # ----- images -------------------------------------------------------------------------------------------
    def get_image_uri(self, image_id: str) -> str:
        check_writable_names(image_id)
        image_nii = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        with self._series_lock(image_id):
            if os.path.exists(image_nii) and image_id in self._datastore.objects:
                return image_nii
            series_dir = os.path.join(self._datastore.image_path(), image_id)
            self._download_series(image_id, series_dir)
            try:
                converted = dicom_to_nifti(series_dir)
            except RuntimeError as e:  # ITK: e.g. a localizer, or slices of different sizes
                detail = f"Series {image_id} cannot be read as one volume: {str(e).strip()[-300:]}"
                raise Unprocessable(detail) from None
            try:
                DurableLocalDatastore.add_image(self, image_id, converted, self._dicom_info(image_id))
            finally:
                os.unlink(converted)
        return image_nii

    # ----- labels: the PACS's view --------------------------------------------------------------------------
    def latest_segs(self, max_age_s: float = 5.0) -> dict[str, dict[str, str]]:
        """``{image series uid: {"seg": SEG series uid, "study": study uid}}``, the newest SEG per image series
        among the listed images (SEGs that reference none of them are ignored). Newest: the SEG's own
        SeriesDate/SeriesTime (+ TimezoneOffsetFromUTC) read from its metadata; on a tie, the SEG this server
        last stored for the series."""
        if self._seg_view and time.time() - self._seg_view[0] < max_age_s:
            return self._seg_view[1]
        found = self._pacs(
            "listing the DICOM SEG series",
            self._client.search_for_series,
            search_filters={"Modality": "SEG"},
            get_remaining=True,
        )
        images = set(self.list_images())
        all_segs: set[str] = set()
        newest: dict[str, tuple[str, int, dict[str, str]]] = {}
        for item in found:
            seg = Dataset.from_json(item)
            seg_uid, study_uid = str(seg.get("SeriesInstanceUID", "")), str(seg.get("StudyInstanceUID", ""))
            if not seg_uid or not study_uid:
                continue
            all_segs.add(seg_uid)
            if seg_uid not in self._seg_sources:
                meta = self._pacs(
                    f"reading SEG series {seg_uid}", self._client.retrieve_series_metadata, study_uid, seg_uid
                )
                if not meta:
                    continue  # asked again next time
                # the pixel data stays behind its bulk-data URI: only the header is read here
                header = Dataset.from_json(meta[0], bulk_data_uri_handler=lambda *_: None)
                self._seg_sources[seg_uid] = (referenced_series(header), seg_time_utc(header))
                segments = header.get("SegmentSequence") or []
                self._seg_names[seg_uid] = [str(s.get("SegmentLabel", "")) for s in segments]
            source, when = self._seg_sources[seg_uid]
            if source not in images:
                continue
            info = self._local_final(source) or {}
            mine = int(info.get("SeriesInstanceUID") == seg_uid)
            if source not in newest or (when, mine) > newest[source][:2]:
                newest[source] = (when, mine, {"seg": seg_uid, "study": study_uid})
        view = {image: entry for image, (_, _, entry) in newest.items()}
        self._all_segs = all_segs
        self._seg_view = (time.time(), view)
        return view

    def _local_final(self, image_id: str) -> dict[str, Any] | None:
        obj = self._datastore.objects.get(image_id)
        label = obj.labels.get(FINAL) if obj else None
        return label.info if label else None

    def _unsent(self) -> list[str]:
        """Final labels whose SEG has not reached the PACS (labels without upload record count as sent)."""
        return [
            image_id
            for image_id, obj in list(self._datastore.objects.items())
            if FINAL in obj.labels and obj.labels[FINAL].info.get("pacs_upload", {}).get("status", "sent") != "sent"
        ]

    def _sync_final_labels(self) -> None:
        """Make the local final labels the PACS's newest SEG per image; labels not yet sent are kept."""
        view = self.latest_segs(max_age_s=0)
        for image_id, entry in view.items():
            info = self._local_final(image_id)
            if info and info.get("SeriesInstanceUID") == entry["seg"] and os.path.exists(self._final_path(image_id)):
                continue
            if info and info.get("pacs_upload", {}).get("status", "sent") != "sent":
                continue  # a newer local label waits to be sent: it wins over the PACS's copy
            if entry["seg"] in self.unreadable_segs:
                continue
            self._read_seg_into_cache(image_id, entry, info)
        for image_id in list(self._datastore.objects):
            info = self._local_final(image_id)
            if info is None or image_id in view or info.get("pacs_upload", {}).get("status", "sent") != "sent":
                continue
            if info.get("SeriesInstanceUID") and info["SeriesInstanceUID"] not in self._all_segs:
                logger.info("Final label of %s: its SEG is no longer in the PACS; removed from the cache", image_id)
                self._remove_final(image_id, info)

    def _remove_final(self, image_id: str, expected: dict[str, Any]) -> None:
        with self.index_write_lock():
            self.reload_index_locked()
            obj = self._datastore.objects.get(image_id)
            label = obj.labels.get(FINAL) if obj else None
            if label is None or label.info != expected:  # saved again meanwhile
                return
            path = os.path.join(self._datastore.label_path(FINAL), label.info.get("name", ""))
            del obj.labels[FINAL]
            self._write_index(lock=False)
        if os.path.isfile(path):
            os.unlink(path)

    def _final_path(self, image_id: str) -> str:
        info = self._local_final(image_id) or {}
        return os.path.join(self._datastore.label_path(FINAL), info.get("name", f"{image_id}.nii.gz"))

    def _read_seg_into_cache(self, image_id: str, entry: dict[str, str], expected: dict[str, Any] | None) -> None:
        """Fetch a SEG and keep it as the image's final label, unless the label changed since ``expected`` was
        read (a save in this or another process wins)."""
        image_nii = self.get_image_uri(image_id)
        seg_dir = os.path.join(self._datastore.label_path(FINAL), f"{entry['seg']}.{uuid.uuid4().hex}")
        try:
            self._download_series(entry["seg"], seg_dir)
            files = sorted(os.listdir(seg_dir))
            try:
                label = read_dicom_seg(os.path.join(seg_dir, files[0]), sitk.ReadImage(image_nii), self.label_names)
            except Exception as e:  # one SEG another tool wrote badly must not stop training on the others
                kept = "its earlier label is used" if expected else "the series is left out of training"
                message = f"SEG {entry['seg']} of series {image_id} cannot be read ({type(e).__name__}: {e}); {kept}"
                logger.error(message)
                self.unreadable_segs[entry["seg"]] = message[:500]
                return
            with tempfile.TemporaryDirectory(prefix="medsam2-seg-") as tmp:
                path = os.path.join(tmp, f"{image_id}.nii.gz")
                sitk.WriteImage(label, path, True)
                info = {"SeriesInstanceUID": entry["seg"], "pacs_upload": {"status": "sent"}, "source": "pacs"}
                DurableLocalDatastore.save_label(self, image_id, path, FINAL, info, only_if=lambda now: now == expected)
        finally:
            shutil.rmtree(seg_dir, ignore_errors=True)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != FINAL:
            return DurableLocalDatastore.get_label_uri(self, label_id, label_tag)
        image_id = image_id or label_id
        if self._local_final(image_id) is None and image_id in self.latest_segs():
            self._sync_final_labels()
        return DurableLocalDatastore.get_label_uri(self, image_id, FINAL)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        if label_tag not in (None, FINAL):
            return DurableLocalDatastore.get_labeled_images(self, label_tag, labels)
        return sorted(set(self.latest_segs()) | set(self._unsent()))

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labeled = set(self.get_labeled_images(label_tag, labels))
        return [image for image in self.list_images() if image not in labeled]

    def status(self) -> dict[str, Any]:
        """``/info``'s datastore part, from what is known: it never waits for the PACS (``/info`` must answer
        while the PACS hangs); ``error`` is the last PACS failure, until a request succeeds again."""
        labeled = set(self._seg_view[1]) if self._seg_view else set()
        unsent = self._unsent()
        status = {
            "total": len(self._known_images),
            "completed": len(labeled | set(unsent)),
            "pacs": self._client.base_url,
            "labels_not_sent": len(unsent),
        }
        if self._last_failure:
            status["error"] = self._last_failure
        if self.unreadable_segs:
            status["unreadable_segs"] = list(self.unreadable_segs.values())[-10:]
        return status

    def unreachable_reason(self, max_age_s: float = 5.0) -> str | None:
        """Why the PACS cannot be reached now (None: it answered a one-series search); checked at most every
        ``max_age_s`` seconds (readiness probes come often)."""
        now = time.monotonic()
        if self._reachability is not None and now - self._reachability[0] < max_age_s:
            return self._reachability[1]
        try:
            self._pacs("checking that the PACS answers", self._client.search_for_series, limit=1)
            reason = None
        except (PacsUnavailable, NotFound) as e:
            reason = e.detail
        self._reachability = (now, reason)
        return reason

    def json(self) -> dict[str, Any]:
        """``/datastore/?output=all``: every series the PACS lists (those not fetched yet without files)."""
        listed = DurableLocalDatastore.json(self)
        objects = listed.setdefault("objects", {})
        for image_id in self.list_images():
            objects.setdefault(image_id, {"image": {"info": {"SeriesInstanceUID": image_id}}, "labels": {}})
        return listed

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Image and final label files for training: unsent labels are sent first, then the PACS's newest SEG
        of every image series is its label."""
        self.send_unsent_labels()
        self._sync_final_labels()
        return DurableLocalDatastore.datalist(self, full_path)

    def all_label_names(self) -> dict[str, int]:
        """The start label names and every name added to any image (one value per name)."""
        added = self.names_store.added() if self.names_store is not None else {}
        return {**added, **self.label_names}

    # ----- saved labels, every version (docs/api.md) -------------------------------------------------------
    def segs_of(self, image_id: str) -> list[dict[str, Any]]:
        """Every SEG series in the PACS drawn on ``image_id``, as ``saved`` entries, newest first."""
        self.latest_segs()
        found = [(when, seg) for seg, (source, when) in self._seg_sources.items() if source == image_id]
        found = sorted(f for f in found if f[1] in self._all_segs)
        return newest_first(
            [
                {
                    "tag": FINAL,
                    "version": n,
                    "source": "pacs",
                    "refine_from": f"seg:{seg}",
                    "saved_at": _iso(when),
                    "names": list(self._seg_names.get(seg, [])),
                    "series_uid": seg,
                }
                for n, (when, seg) in enumerate(found, start=1)
            ]
        )

    def seg_label_file(self, image_id: str, seg_uid: str) -> str:
        """A SEG series of ``image_id`` as a label file on the image's grid (kept in the cache); 404 for a SEG
        the PACS does not have, 422 for one drawn on another series (naming both grids)."""
        if not SEG_UID.match(seg_uid):
            raise Unprocessable(f"seg:{seg_uid[:80]} does not name a DICOM series (a UID: digits and dots).")
        if seg_uid not in self._seg_sources:
            self.latest_segs(max_age_s=0)
        if seg_uid not in self._seg_sources or seg_uid not in self._all_segs:
            raise NotFound(f"The PACS has no DICOM SEG series {seg_uid}: GET /medsam2/labels/{image_id} lists them.")
        image = sitk.ReadImage(self.get_image_uri(image_id))
        source = self._seg_sources[seg_uid][0]
        if source != image_id:
            raise Unprocessable(
                f"The DICOM SEG {seg_uid} was drawn on the series {source or '(not named)'} "
                f"({self._grid_of(source)}), not on the image {image_id} ({describe_image_grid(image)}): open "
                "that series to refine it, or pick a label saved on this image."
            )
        path = os.path.join(self._datastore_path, "segs", f"{seg_uid}.nii.gz")
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._decode_seg(seg_uid, image, path)
        return path

    def _grid_of(self, image_id: str) -> str:
        """The grid of another image series, in words (for a message)."""
        if image_id not in self.list_images():
            return "a series this server does not list"
        try:
            return describe_image_grid(sitk.ReadImage(self.get_image_uri(image_id)))
        except AppError:
            return "a series that cannot be read"

    def _decode_seg(self, seg_uid: str, image: sitk.Image, path: str) -> None:
        seg_dir = os.path.join(self._datastore_path, "segs", f"{seg_uid}.{uuid.uuid4().hex}")
        try:
            self._download_series(seg_uid, seg_dir)
            files = sorted(os.listdir(seg_dir))
            try:
                label = read_dicom_seg(os.path.join(seg_dir, files[0]), image, self.all_label_names())
            except Exception as e:  # another tool's SEG: say why, keep serving
                raise Unprocessable(f"The DICOM SEG {seg_uid} cannot be read ({type(e).__name__}: {e}).") from None
            with atomic_write(path) as tmp:
                sitk.WriteImage(label, tmp + ".nii.gz", True)
                os.replace(tmp + ".nii.gz", tmp)
        finally:
            shutil.rmtree(seg_dir, ignore_errors=True)

    def _keep_earlier_version(self, image_id: str, obj: Any, label_tag: str) -> int:
        """A final label already in the PACS is kept there (its SEG series): only an unsent one is copied."""
        current = obj.labels.get(label_tag)
        if label_tag == FINAL and current is not None and current.info.get("pacs_upload", {}).get("status") == "sent":
            return int(current.info.get(VERSION_KEY, 1))
        return super()._keep_earlier_version(image_id, obj, label_tag)

    # ----- saving -------------------------------------------------------------------------------------------
    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """Keep the label on this server first; a final label then goes to the PACS as a DICOM SEG."""
        check_writable_names(image_id, label_tag)
        image_nii = self.get_image_uri(image_id)
        converted = ""
        if label_filename.endswith(".bin"):  # OHIF: raw voxels in the image's shape
            try:
                converted = label_filename = binary_to_image(image_nii, label_filename)
            except ValueError as e:
                raise Unprocessable(f"Label not saved: the raw label does not fit the image ({e}).") from None
        try:
            if label_tag != FINAL:
                return DurableLocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
            try:
                label = label_on_image_grid(label_filename, sitk.ReadImage(image_nii))
                if not np.any(sitk.GetArrayViewFromImage(label)):
                    raise SegError("the label is empty (a DICOM SEG needs at least one labelled voxel)")
            except SegError as e:
                raise Unprocessable(f"Label not saved: {e}") from None
            except RuntimeError as e:
                detail = f"Label not saved: cannot read the label file ({e})."
                raise UnsupportedMedia(detail) from None
            with tempfile.TemporaryDirectory(prefix="medsam2-label-") as tmp:
                path = os.path.join(tmp, f"{image_id}.nii.gz")
                sitk.WriteImage(label, path, True)
                info = {**(label_info or {}), "pacs_upload": {"status": "pending"}, "save_id": uuid.uuid4().hex}
                DurableLocalDatastore.save_label(self, image_id, path, FINAL, info)
        finally:
            if converted:
                os.unlink(converted)
        self._seg_view = None
        self._send(image_id, raise_on_failure=True)  # other unsent labels: the resend thread
        return image_id

    def send_unsent_labels(self) -> list[str]:
        """Send every final label whose SEG has not reached the PACS yet; returns those still not sent."""
        return [image_id for image_id in self._unsent() if not self._send(image_id, raise_on_failure=False)]

    def _send(self, image_id: str, raise_on_failure: bool) -> bool:
        with self._send_lock:
            return self._send_locked(image_id, raise_on_failure)

    def _send_locked(self, image_id: str, raise_on_failure: bool) -> bool:
        info = self._local_final(image_id)
        if info is None or info.get("pacs_upload", {}).get("status", "sent") == "sent":
            return True
        sending = info
        try:
            self.get_image_uri(image_id)  # the series files the SEG references
            label = sitk.ReadImage(self._final_path(image_id))
            values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label)) if v]
            segments = segments_for(values, info.get("label_info"), self.all_label_names())
            seg = write_dicom_seg(
                label,
                os.path.join(self._datastore.image_path(), image_id),
                segments,
                series_description=f"MedSAM2 {info.get('model', '')}".strip(),
                creator=str(info.get("user") or ""),
            )
            self._pacs(f"storing the DICOM SEG of series {image_id}", self._client.store_instances, [seg])
            sent = {"status": "sent", "at": int(time.time())}
            info = {**info, "SeriesInstanceUID": str(seg.SeriesInstanceUID), "pacs_upload": sent}
        except (
            PacsUnavailable,
            AppError,
            requests.RequestException,
            SegError,
            RuntimeError,
            OSError,
            subprocess.SubprocessError,  # dcmqi ran past its timeout
        ) as e:
            if isinstance(e, AppError):
                message = str(e.detail)
            elif isinstance(e, (PacsUnavailable, SegError)):
                message = str(e)
            else:
                message = f"{type(e).__name__}: {e}"
            failed = {"status": "failed", "error": message[:500], "at": int(time.time())}
            self._update_label_info(image_id, sending, {**info, "pacs_upload": failed})
            logger.error("Final label of %s kept on this server, not in the PACS: %s", image_id, message)
            if raise_on_failure:
                raise PacsUploadFailed(
                    f"The label of {image_id} is saved on the MONAI Label server, but storing it in the PACS as "
                    f"DICOM SEG failed: {message} It is kept and sent again with the next save or training run."
                ) from None
            return False
        self._update_label_info(image_id, sending, info)
        self._seg_view = None
        return True

    def _update_label_info(self, image_id: str, expected: dict[str, Any], info: dict[str, Any]) -> None:
        """Record how sending went, unless the label was saved again meanwhile (its own send records that)."""
        with self.index_write_lock():
            self.reload_index_locked()
            obj = self._datastore.objects.get(image_id)
            if obj and FINAL in obj.labels and obj.labels[FINAL].info.get("save_id") == expected.get("save_id"):
                obj.labels[FINAL].info = info
                self._write_index(lock=False)


def _iso(when: str) -> str | None:
    """A SEG's sortable UTC time ('YYYYmmddHHMMSS.ffffff') as ISO 8601."""
    if not when:
        return None
    return datetime.strptime(when, "%Y%m%d%H%M%S.%f").replace(tzinfo=UTC).isoformat(timespec="seconds")


def _remember_patient(path: str) -> None:
    """The names and ids of the patient of a downloaded DICOM file, for the log scrubber."""
    try:
        remember_identifiers(identifying_values(pydicom.dcmread(path, stop_before_pixels=True)))
    except Exception as e:  # not readable here: the conversion reports it
        logger.debug("No patient attributes read from a downloaded file: %s", type(e).__name__)


def _download(series_uid: str, folder: str, client: DICOMwebClient, by_frame: bool) -> None:
    from monailabel.datastore.utils.dicom import dicom_web_download_series

    os.makedirs(folder, exist_ok=True)
    try:
        dicom_web_download_series(None, series_uid, folder, client, by_frame)
    except IndexError:  # the series search found nothing
        raise NotFound(f"The PACS has no series {series_uid}.") from None
    for name in os.listdir(folder):  # a SEG or a series of files, each must parse
        pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
