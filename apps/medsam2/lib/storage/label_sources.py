"""Which label file an inference request starts from: a label uploaded with it, or a saved label it names."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from lib.errors import BadRequest, NotFound, Unprocessable
from lib.storage.names import SAFE_LABEL_TAG

# set by the server only: a client-sent value under this key is dropped, so no request can name a server path
LABEL_FILE_KEY = "_medsam2_label_file"
# set by the server only, like LABEL_FILE_KEY: the label names added to the request's image (name -> value)
LABEL_NAMES_KEY = "_medsam2_label_names"
SEG_PREFIX = "seg:"  # refine_from naming a DICOM SEG series of the image (next to a PACS)


def is_upload(path: str) -> bool:
    """MONAI Label stores an uploaded file as a temporary file directly in the temp folder and passes its absolute
    path in the request (a relative id such as ``apps`` is never an upload, even under the temp folder)."""
    return os.path.isabs(path) and os.path.dirname(os.path.realpath(path)) == os.path.realpath(tempfile.gettempdir())


def attach_label_file(request: dict[str, Any], datastore: Any) -> None:
    """Put the label file a request starts from under :data:`LABEL_FILE_KEY` as {"path", "source"}.

    MONAI Label's ``/infer`` route replaces the request's ``label`` with the path of an uploaded label file; the
    label's name then comes from ``label_name`` (Slicer's scribbles send ``selected_label_name``). ``refine_from``
    names a saved label (``final``, ``original``, an older version such as ``final-v2``, or another label tag) of
    the request's image; next to a PACS also ``seg:<SeriesInstanceUID>``, a DICOM SEG series of the image.
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
    if tag.startswith(SEG_PREFIX):
        request[LABEL_FILE_KEY] = {"path": seg_label_file(datastore, str(request.get("image")), tag), "source": tag}
        return
    if not SAFE_LABEL_TAG.match(tag):
        raise BadRequest(
            "refine_from must be final, original, last, a label tag (letters, digits, _ and -) or seg:<SEG series "
            f"UID> (GET /medsam2/labels/<image> lists them), got {tag[:80]!r}."
        )
    path = datastore.get_label_uri(str(request.get("image")), tag)
    if not path or not os.path.exists(path):
        raise NotFound(
            f"The image {request.get('image')} has no {tag!r} label to refine: save a label first, "
            "or refine the session's last answer (refine_from: last)."
        )
    request[LABEL_FILE_KEY] = {"path": path, "source": tag}


def seg_label_file(datastore: Any, image_id: str, refine_from: str) -> str:
    """``seg:<SeriesInstanceUID>``: that DICOM SEG series of the image, decoded onto the image's grid."""
    if not hasattr(datastore, "seg_label_file"):
        raise Unprocessable(
            f"refine_from {refine_from[:80]!r} names a DICOM SEG series, but this server reads a local studies folder: "
            "refine a label tag instead (GET /medsam2/labels/<image> lists them)."
        )
    return datastore.seg_label_file(image_id, refine_from.removeprefix(SEG_PREFIX))


def attach_label_names(request: dict[str, Any], datastore: Any) -> None:
    """Put the names added to the request's image (``POST /medsam2/labels/{image}/names``) under
    :data:`LABEL_NAMES_KEY`, so a prompt may name them; a client-sent value is dropped."""
    request.pop(LABEL_NAMES_KEY, None)
    store = getattr(datastore, "names_store", None)
    image = request.get("image")
    if store is None or not isinstance(image, str):
        return
    added = {k: v for k, v in store.of_image(image).items() if k not in store.start_names}
    if added:
        request[LABEL_NAMES_KEY] = added
