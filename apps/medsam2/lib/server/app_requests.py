"""What the app checks and adds around MONAI Label's own handling of an inference request, a next-sample request
and an image a viewer opened: clear 4xx answers, the admission gate, and encoding the image ahead."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Any

from monailabel.interfaces.datastore import Datastore

from lib.errors import BadRequest, NotFound
from lib.server.admission import AdmissionGate
from lib.server.served_models import ServedModels
from lib.storage.label_sources import attach_label_file, attach_label_names, is_upload
from lib.storage.pacs_datastore import PacsDatastore

# strategies that do not run a model: no inference slot needed
MODEL_FREE_STRATEGIES = (None, "", "random", "first")


def prepare_infer_request(request: dict[str, Any], models: Collection[str], datastore: Datastore) -> None:
    """``POST /infer``: a datastore image (or an upload) and a known model, else 400/404; a label file named by
    the request (``refine_from`` ...) attached from the datastore."""
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise BadRequest("No image given: pass ?image=<image id> or upload a file.")
    if os.path.exists(image) and not is_upload(image):
        raise BadRequest("Image ids name datastore images, not server file paths.")
    if request.get("model") not in models:
        raise NotFound(f"Unknown model {request.get('model')!r}; available: {sorted(models)}")
    attach_label_file(request, datastore)
    attach_label_names(request, datastore)


def next_sample(
    request: dict[str, Any],
    strategies: Collection[str],
    admission: AdmissionGate,
    run: Callable[[dict[str, Any]], dict[str, Any]],
    opened: Callable[[str, str], None],
) -> dict[str, Any]:
    """``POST /activelearning/{strategy}``: a strategy that runs the model takes an inference slot first (MONAI
    Label runs it on its event loop, beside the inference threads, and two model calls at once are what
    ``max_concurrent_infers`` bounds); the image it picks is opened next, so it is encoded ahead."""
    strategy = request.get("strategy")
    if strategy and strategy not in strategies:
        raise NotFound(f"Unknown active-learning strategy {strategy!r}; available: {sorted(strategies)}.")
    if strategy in MODEL_FREE_STRATEGIES:
        answer = run(request)
    else:
        with admission.admit():
            answer = run(request)
    if isinstance(answer, dict) and isinstance(answer.get("id"), str):
        opened(answer["id"], "next sample")
    return answer


def image_opened(image_id: str, source: str, datastore: Datastore, models: ServedModels) -> None:
    """A viewer opened (or is handed) this image: encode it in the background (:mod:`lib.engine.encode_ahead`).
    Returns at once; the image is read (downloaded from the PACS) by the background worker."""
    if isinstance(datastore, PacsDatastore) and not datastore.knows_image(image_id):
        return  # a SEG series or a series outside the datastore's filter

    def image_path() -> str:
        path = datastore.get_image_uri(image_id)
        if not path or not os.path.isfile(path):
            raise NotFound(f"Image {image_id!r} is not in the datastore.")
        return path

    models.open_ahead(image_id, source, image_path)
