"""The app's one error type: :class:`AppError` carries the HTTP status, the ``detail`` an administrator or a
viewer can act on, and headers (``Retry-After``). Engine, imaging, storage and training raise these domain
errors and never a web framework's; one handler (``lib/server/error_handlers.py``) turns them into answers.
Pure Python: no web framework imported here.
"""

from __future__ import annotations


class AppError(Exception):
    """A request the app cannot serve as sent. ``str(error)`` is the message, ``detail`` what the client sees."""

    status: int = 500

    def __init__(self, detail: str, status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})


class Refused(AppError):
    """A request refused before anything runs (the request guard, access control): any 4xx status."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail, status, headers)


class BadRequest(AppError):
    status = 400


class NotFound(AppError):
    status = 404


class Unprocessable(AppError):
    """Well-formed, but not something this server can do (422)."""

    status = 422


class Conflict(AppError):
    """The request names a state the server does not hold, or conflicts with one it does (409)."""

    status = 409


class StateNotHeld(Conflict):
    """``changed_since`` names an answer this annotator's session does not hold (docs/api.md)."""

    def __init__(self, answer_id: str):
        super().__init__(
            f"changed_since {answer_id[:80]!r} names a state this session does not hold (an unknown answer_id, a "
            "session dropped from the server's cache or started before a restart, or one on another server). Send "
            "the request again without changed_since to get the whole label, and continue from its answer_id."
        )
        self.answer_id = answer_id


class CropUnavailable(Unprocessable):
    """A region-of-interest crop of the image that cannot be formed for this request (422)."""


class UnsupportedMedia(AppError):
    status = 415


class PromptError(AppError, ValueError):
    """Prompts (boxes, clicks, slices, labels, options) that cannot be used as sent: 422 unless told otherwise."""

    status = 422


class ImageUnreadable(AppError, ValueError):
    """An image file that cannot be read as an image (415 unless told otherwise, e.g. 413 for too large)."""

    status = 415


class ServiceUnavailable(AppError):
    """The server cannot serve this now; worth retrying after ``retry_after_s`` seconds."""

    status = 503

    def __init__(self, detail: str, retry_after_s: int = 10):
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class ServerBusy(ServiceUnavailable):
    """The admission gate did not let the request in (queue full, or waited too long)."""


class PacsUnavailable(ServiceUnavailable):
    """The PACS did not answer (down, unreachable, too slow) or answered with a server error."""


class PacsRefusedCredentials(AppError):
    """The PACS refused this server's own credentials (401/403): an administrator's setting, not the user's rights."""

    status = 502


class PacsUploadFailed(AppError):
    """The label is kept on this server, but the PACS did not take its DICOM SEG."""

    status = 502


class ModelUnavailable(AppError):
    """The model cannot be built or loaded (checkpoint missing, unreadable, or not matching its config)."""

    status = 503

    def __init__(self, message: str):
        super().__init__(message)
        self.detail = f"The model could not be loaded: {message}"


class TooManySessions(AppError):
    """The server holds its cap of live annotation sessions (429, with ``Retry-After``)."""

    status = 429

    def __init__(self, detail: str, retry_after_s: int):
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s
