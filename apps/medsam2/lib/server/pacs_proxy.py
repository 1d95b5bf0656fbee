"""MONAI Label's DICOMweb proxy (``/proxy/dicom/...``, what OHIF loads studies through), with a timeout.

MONAI Label 0.8.5 forwards each request with ``requests`` inside an ``async`` handler and no timeout: one
request to a PACS that hangs blocks the server's event loop for good (every endpoint, ``/info/`` included),
and a PACS that is down answers 500 with a stack trace. Here the forwarding runs in a thread with a
(connect, read) timeout, and a PACS that fails answers 503 with a message naming it; one that refuses this
server's own credentials (401/403) answers 502 saying which setting to check.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor

import requests
from fastapi import Request
from fastapi.responses import Response

from lib.errors import PacsRefusedCredentials, PacsUnavailable
from lib.server.server_process import in_server
from lib.storage.pacs_datastore import REFUSED_CREDENTIALS, credentials_refused, describe_failure, pacs_credentials

logger = logging.getLogger(__name__)
# its own threads: requests waiting for a slow PACS must not take the pool that serves file up/downloads
_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="medsam2-pacs-proxy")


def _prefix(settings, op: str, path: str) -> str:
    if op == "wado" or (op == "qido" and path.endswith("metadata")):  # some OHIF versions ask QIDO for metadata
        return settings.MONAI_LABEL_WADO_PREFIX
    if op == "qido":
        return settings.MONAI_LABEL_QIDO_PREFIX
    if op == "stow":
        return settings.MONAI_LABEL_STOW_PREFIX
    return ""


# never passed on to the PACS: the viewer's credentials for this server (docs/api.md), and what requests sets itself
NOT_FORWARDED = ("host", "authorization", "x-api-key", "cookie", "content-length")


def install_pacs_proxy(timeout_s: float, token_file: str = "") -> bool:
    """Replace the function MONAI Label's proxy routes call; False outside the server."""
    if not in_server():
        return False
    from monailabel.config import settings
    from monailabel.endpoints import proxy

    auth = pacs_credentials(settings, token_file)
    if getattr(proxy.proxy_dicom, "_medsam2_timeout", None) is not None:
        proxy.proxy_dicom._medsam2_timeout = timeout_s
        proxy.proxy_dicom._medsam2_auth = auth
        return True
    google_proxy = proxy.proxy_dicom

    async def proxy_dicom(request: Request, op: str, path: str):
        server = settings.MONAI_LABEL_STUDIES.rstrip("/")
        if "googleapis.com" in server:  # needs Google credentials: MONAI Label's own code
            return await google_proxy(request, op, path)
        prefix = _prefix(settings, op, path)
        url = f"{server}/{prefix}/{path}" if prefix else f"{server}/{path}"
        body = await request.body() if request.method == "POST" else None
        headers = dict(request.headers) if request.method == "POST" else {}
        headers = {k: v for k, v in headers.items() if k.lower() not in NOT_FORWARDED}
        limit, auth = proxy_dicom._medsam2_timeout, proxy_dicom._medsam2_auth
        what = f"serving {request.method} {op or 'dicom'}/{path}"

        def forward() -> requests.Response:
            return requests.request(
                request.method,
                url,
                params=request.query_params.multi_items(),  # repeated keys such as includefield
                data=body,
                headers=headers,
                auth=auth,
                timeout=(min(limit, 10.0), limit),
            )

        try:
            answer = await asyncio.get_running_loop().run_in_executor(_POOL, contextvars.copy_context().run, forward)
        except requests.RequestException as e:
            message = describe_failure(server, what, e, limit)
            logger.error(message)
            raise PacsUnavailable(message) from None  # answered by the one error handler (lib.server.error_handlers)
        if answer.status_code in REFUSED_CREDENTIALS:  # the viewer's credentials are never forwarded
            message = credentials_refused(server, what, answer.status_code)
            logger.error(message)
            raise PacsRefusedCredentials(message)
        passed = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding", "connection")
        }
        return Response(content=answer.content, status_code=answer.status_code, headers=passed)

    proxy_dicom._medsam2_timeout = timeout_s  # type: ignore[attr-defined]
    proxy_dicom._medsam2_auth = auth  # type: ignore[attr-defined]
    proxy.proxy_dicom = proxy_dicom
    return True
