"""Which label file an inference request starts from: a label uploaded with it, or a saved label it names."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from lib.errors import BadRequest, NotFound
from lib.storage.names import SAFE_LABEL_TAG

# set by the server only: a client-sent value under this key is dropped, so no request can name a server path
LABEL_FILE_KEY = "_medsam2_label_file"


def is_upload(path: str) -> bool:
    """MONAI Label stores an uploaded file as a temporary file directly in the temp folder and passes its absolute
    path in the request (a relative id such as ``apps`` is never an upload, even under the temp folder)."""
    return os.path.isabs(path) and os.path.dirname(os.path.realpath(path)) == os.path.realpath(tempfile.gettempdir())


def attach_label_file(request: dict[str, Any], datastore: Any) -> None:
    """Put the label file a request starts from under :data:`LABEL_FILE_KEY` as {"path", "source"}.

    MONAI Label's ``/infer`` route replaces the request's ``label`` with the path of an uploaded label file; the
    label's name then comes from ``label_name`` (Slicer's scribbles send ``selected_label_name``). ``refine_from``
    names a saved label (``final``, ``original`` or another label tag) of the request's image.
    """
    request.pop(LABEL_FILE_KEY, None)
    label = request.get("label")
    uploaded = isinstance(label, str) and is_upload(label) and os.path.isfile(label)
    if uploaded:
        request[LABEL_FILE_KEY] = {"path": label, "source": "upload"}
        request["label"] = request.get("label_name")
    refine = request.get("refine_from")
    if refine in (None, "", "last", "upload"):
        return
    if uploaded:
        raise BadRequest("Send either a label file or refine_from, not both: which label should be refined?")
    tag = str(refine)
    if not SAFE_LABEL_TAG.match(tag):
        raise BadRequest(
            f"refine_from must be final, original, last or a label tag (letters, digits, _ and -), got {tag[:80]!r}."
        )
    path = datastore.get_label_uri(str(request.get("image")), tag)
    if not path or not os.path.exists(path):
        raise NotFound(
            f"The image {request.get('image')} has no {tag!r} label to refine: save a label first, "
            "or refine the session's last answer (refine_from: last)."
        )
    request[LABEL_FILE_KEY] = {"path": path, "source": tag}
