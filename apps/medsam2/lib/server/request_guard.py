"""Checks on what a client sends to ``POST /infer/{model}`` and ``POST /train/{model}`` before MONAI Label acts
on it, so that hostile or malformed requests get a 4xx that says what to change instead of a 500, a file
outside the datastore, or a training run started with options it will crash on.

MONAI Label 0.8.5 on its own answers 500 when ``params`` is JSON but not an object or nested too deeply, lets
keys in ``params`` replace the image (any server path), the model and the label tag (a folder name the
answer's label is saved under, so ``../..`` writes outside the datastore), reads ``session_id`` as a path
below its sessions folder (and deletes that folder if it looks dangling), builds a temporary file name from
the upload's name, and starts a training subprocess for any ``/train`` body. Plain Python except
:func:`install`, which wraps MONAI Label's endpoint functions.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from lib.errors import Refused
from lib.server.server_process import in_server
from lib.storage.names import SAFE_LABEL_TAG, is_path_like
from lib.training.options import check_client_id

logger = logging.getLogger(__name__)

MAX_PARAMS_DEPTH = 16  # our prompts nest 4 deep ({"prompts": [{"box": [...]}]})
SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: hostile input must not exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_PARAMS_DEPTH:
                break
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_infer_params(text: str | None) -> dict[str, Any]:
    """``params`` as MONAI Label will read it: a JSON object (``{}`` when empty); Refused(400) otherwise."""
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise Refused(400, f"'params' is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}).") from None
    except RecursionError:
        raise Refused(400, f"'params' is nested too deeply; at most {MAX_PARAMS_DEPTH} levels.") from None
    if not isinstance(params, dict):
        raise Refused(400, f'\'params\' must be a JSON object such as {{"label": "lesion"}}, got {text[:80]!r}.')
    if _depth(params) > MAX_PARAMS_DEPTH:
        raise Refused(400, f"'params' is nested too deeply; at most {MAX_PARAMS_DEPTH} levels.")
    return params


def check_infer_request(
    model: str,
    image: str,
    session_id: str,
    params: dict[str, Any],
    uploaded: bool,
    output: str | None,
    dicom_seg_supported: bool = False,
) -> None:
    """Refuse what MONAI Label would answer with a 500 or act on outside the datastore."""
    if not uploaded and not image and not session_id:
        raise Refused(400, "No image given: pass ?image=<image id> or upload a file.")
    if image and not uploaded and is_path_like(image):
        raise Refused(400, f"Image ids name datastore images, not server file paths: {image[:200]!r}.")
    if session_id and is_path_like(session_id):
        raise Refused(400, f"session_id must be an id returned by PUT /session/, got {session_id[:200]!r}.")
    if "image" in params and (uploaded or params["image"] != image):
        raise Refused(400, "Pass the image as ?image=<image id> (or upload a file), not inside 'params'.")
    if "model" in params and params["model"] != model:
        raise Refused(400, f"'params' names model {params['model']!r} but the URL names {model!r}.")
    tag = params.get("label_tag")
    if tag is not None and not (isinstance(tag, str) and SAFE_LABEL_TAG.match(tag)):
        raise Refused(
            400, f"label_tag must be a name of letters, digits, '-' or '_' (such as 'original'), got {tag!r}."
        )
    if params.get("save_label") is not None and not isinstance(params["save_label"], bool):
        raise Refused(400, f"save_label must be true or false, got {params['save_label']!r}.")
    if params.get("save_label") and tag == "final":
        # /infer needs only the user role; a final label is an annotator's act (PUT /datastore/label)
        raise Refused(403, "Inference may not save a final label; save it with PUT /datastore/label.")
    timeout = params.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf)
    ):
        raise Refused(400, f"timeout must be a positive number of seconds, got {timeout!r}.")
    device = params.get("device")
    if device is not None and not isinstance(device, str):
        raise Refused(400, f"device must be a string such as 'cuda' or 'cpu', got {device!r}.")
    if output == "dicom_seg" and not dicom_seg_supported:
        raise Refused(400, "output=dicom_seg needs a DICOMweb datastore; use output=image, json or all.")


def safe_upload_name(filename: str | None) -> str | None:
    """The upload's name reduced to ``upload`` plus its file-type suffixes (MONAI Label builds the temporary
    file's name from them): no separators, NUL bytes or over-long names reach the file system."""
    if not filename:
        return filename
    name = PurePosixPath(filename.replace("\\", "/").replace("\x00", "")).name
    suffixes = [s for s in PurePosixPath(name).suffixes if SAFE_SUFFIX.match(s)][-2:]
    return "upload" + "".join(suffixes)


LABEL_UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")


def safe_label_name(filename: str | None) -> str:
    """An uploaded label's name, reduced as :func:`safe_upload_name` does; NIfTI or NRRD only (415 otherwise)."""
    name = safe_upload_name(filename or "label.nii.gz") or "upload.nii.gz"
    if not name.lower().endswith(LABEL_UPLOAD_SUFFIXES):
        raise Refused(415, f"Send the label file as NIfTI (.nii.gz, .nii) or NRRD (.nrrd), not {filename!r:.80}.")
    return name


def _dicomweb() -> bool:
    from monailabel.datastore.dicom import DICOMWebDatastore
    from monailabel.interfaces.utils.app import app_instance

    return isinstance(app_instance().datastore(), DICOMWebDatastore)


_check_train: Callable[[str, Any], None] | None = None  # the current app's (POST /reload makes a new one)


def install(check_train: Callable[[str, Any], None]) -> bool:
    """Wrap MONAI Label's ``run_inference`` and ``run_model``/``run`` (train) with these checks; its routes look
    them up at call time, so the threaded infer route of :mod:`lib.server.threaded_routes` gets them too.
    ``check_train`` raises :class:`Refused` for a train request that must not start. False outside the
    server."""
    global _check_train
    _check_train = check_train
    if not in_server():
        return False
    from monailabel.endpoints import infer as infer_endpoints
    from monailabel.endpoints import train as train_endpoints

    if not getattr(infer_endpoints.run_inference, "_medsam2_guard", False):
        run_inference = infer_endpoints.run_inference

        @functools.wraps(run_inference)
        def guarded_inference(
            background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None
        ):
            parsed = parse_infer_params(params)
            output_kind = getattr(output, "value", output)
            check_infer_request(
                model,
                image,
                session_id,
                parsed,
                bool(file),
                output_kind,
                output_kind == "dicom_seg" and _dicomweb(),
            )
            if file is not None:
                file.filename = safe_upload_name(file.filename)
            if label is not None:  # scribbles or a label to refine; never a .bin (MONAI Label would convert it)
                label.filename = safe_label_name(label.filename)
            return run_inference(background_tasks, model, image, session_id, params, file, label, output)

        guarded_inference._medsam2_guard = True  # type: ignore[attr-defined]
        infer_endpoints.run_inference = guarded_inference

    if not getattr(train_endpoints.run_model, "_medsam2_guard", False):
        run_model = train_endpoints.run_model
        run_all = train_endpoints.run

        @functools.wraps(run_model)
        def guarded_run_model(model, params=None, run_sync=False, enqueue=False):
            if _check_train is not None:
                _check_train(model, params or {})
            return run_model(model, params, run_sync, enqueue)

        @functools.wraps(run_all)
        def guarded_run_all(params=None, run_sync=False):
            from monailabel.interfaces.utils.app import app_instance

            trainers = list(app_instance().info().get("trainers", {}))
            # MONAILabelClient.train_start(None, ...) posts here with the client_id it adds to every body
            unknown = sorted(set(params or {}) - set(trainers) - {"client_id"})
            if unknown:
                raise Refused(422, f"POST /train/ takes {{<model>: {{options}}}} for {trainers}; got {unknown}.")
            try:
                check_client_id((params or {}).get("client_id"))
            except ValueError as e:
                raise Refused(422, f"Training not started: {e}.") from None
            for model in trainers:
                if _check_train is not None:
                    _check_train(model, (params or {}).get(model) or {})
            return run_all(params, run_sync)

        guarded_run_model._medsam2_guard = True  # type: ignore[attr-defined]
        guarded_run_all._medsam2_guard = True  # type: ignore[attr-defined]
        train_endpoints.run_model = guarded_run_model
        train_endpoints.run = guarded_run_all
    return True


def is_installed() -> bool:
    """The guarded functions are the ones MONAI Label's infer and train routes will call."""
    from monailabel.endpoints import infer as infer_endpoints
    from monailabel.endpoints import train as train_endpoints

    return all(
        getattr(f, "_medsam2_guard", False)
        for f in (infer_endpoints.run_inference, train_endpoints.run_model, train_endpoints.run)
    )


def check_scoring_method(method: str, available: list[str]) -> None:
    """``POST /scoring/{method}``: an unknown method is a 404, before MONAI Label starts a scoring process."""
    if method not in available:
        have = f"available: {sorted(available)}" if available else "this app has no scoring methods"
        raise Refused(404, f"Unknown scoring method {method!r}; {have}.")


def check_batch_model(model: str, infers: dict[str, Any]) -> None:
    """``POST /batch/infer/{model}``: refuse, before MONAI Label starts a batch process, a model this server does
    not have or one that cannot run without a person's prompts."""
    if model not in infers:
        raise Refused(404, f"Unknown model {model!r}; available: {sorted(infers)}.")
    if getattr(infers[model], "interactive", False):
        raise Refused(
            422,
            f"{model} is an interactive model: it segments from a box or clicks on a slice, which a batch run "
            f"over the datastore does not have. Send each image with its prompts to POST /infer/{model}.",
        )


def check_wsi_model(model: str, infers: dict[str, Any]) -> None:
    """``POST /infer/wsi*/{model}``: this app serves no whole-slide (pathology) models."""
    raise Refused(
        404,
        f"No whole-slide model {model!r}: this app serves 3D/2D images; use POST /infer/{{model}} with one of "
        f"{sorted(infers)}.",
    )


def install_task_guard() -> bool:
    """Wrap MONAI Label's ``scoring.run_method``, ``batch_infer.run`` and ``wsi_infer.run_wsi_inference`` (looked
    up by name at call time by their routes) with :func:`check_scoring_method`, :func:`check_batch_model` and
    :func:`check_wsi_model`. False outside the server."""
    if not in_server():
        return False
    from monailabel.endpoints import batch_infer, scoring, wsi_infer
    from monailabel.interfaces.utils.app import app_instance

    if not getattr(wsi_infer.run_wsi_inference, "_medsam2_guard", False):

        @functools.wraps(wsi_infer.run_wsi_inference)
        def refuse_wsi(background_tasks, model, *args, **kwargs):
            check_wsi_model(model, app_instance()._infers)

        refuse_wsi._medsam2_guard = True  # type: ignore[attr-defined]
        wsi_infer.run_wsi_inference = refuse_wsi

    if not getattr(scoring.run_method, "_medsam2_guard", False):
        run_method = scoring.run_method

        @functools.wraps(run_method)
        def guarded_run_method(method, params=None, run_sync=False):
            check_scoring_method(method, list(app_instance().info().get("scoring", {})))
            return run_method(method, params, run_sync)

        guarded_run_method._medsam2_guard = True  # type: ignore[attr-defined]
        scoring.run_method = guarded_run_method

    if not getattr(batch_infer.run, "_medsam2_guard", False):
        run_batch = batch_infer.run

        @functools.wraps(run_batch)
        def guarded_batch(model, images=None, params=None, run_sync=False):
            check_batch_model(model, app_instance()._infers)
            return run_batch(model, images, params, run_sync)

        guarded_batch._medsam2_guard = True  # type: ignore[attr-defined]
        batch_infer.run = guarded_batch
    return all(
        getattr(f, "_medsam2_guard", False) for f in (scoring.run_method, batch_infer.run, wsi_infer.run_wsi_inference)
    )
