"""Which datastore ``--studies`` names: a DICOMweb PACS (:class:`PacsDatastore`), Google's Healthcare API
(MONAI Label's own DICOMweb datastore), or a local folder (:class:`CineLocalDatastore`)."""

from __future__ import annotations

from collections.abc import Callable

from monailabel.config import settings
from monailabel.interfaces.datastore import Datastore

from lib.storage.local_datastore import CINE_PATTERNS, CineLocalDatastore
from lib.storage.pacs_datastore import PacsDatastore, TimeoutSession, pacs_credentials


def make_datastore(
    studies: str,
    label_names: dict[str, int],
    timeout_s: float,
    resend_every_s: float,
    monailabels_own: Callable[[], Datastore],
    token_file: str = "",
) -> Datastore:
    """The datastore of ``studies``; ``monailabels_own`` makes MONAI Label's (for Google's Healthcare API)."""
    if studies.startswith(("http://", "https://")):
        if "googleapis.com" in studies:
            return monailabels_own()
        datastore = pacs_datastore(studies, label_names, timeout_s, resend_every_s, token_file)
        datastore.keep_label_names(label_names)
        return datastore
    patterns = [*settings.MONAI_LABEL_DATASTORE_FILE_EXT]
    patterns += [p for pattern in CINE_PATTERNS for p in (pattern, pattern.upper()) if p not in patterns]
    local = CineLocalDatastore(
        studies,
        extensions=patterns,
        auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
        read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
    )
    local.keep_label_names(label_names)
    return local


def pacs_datastore(
    url: str, label_names: dict[str, int], timeout_s: float, resend_every_s: float, token_file: str = ""
) -> PacsDatastore:
    """DICOMweb with timeouts, 503s and SEG final labels (:mod:`lib.storage.pacs_datastore`); ``resend_every_s``
    0: no resending (a training process reads labels and leaves); ``token_file``: a bearer token for the PACS."""
    from monailabel.datastore.dicom import DICOMwebClientX

    client = DICOMwebClientX(
        url=url,
        session=TimeoutSession(timeout_s, pacs_credentials(settings, token_file)),
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    cache = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    return PacsDatastore(
        client,
        settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        cache or None,
        label_names,
        timeout_s=timeout_s,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        resend_every_s=resend_every_s,
    )
