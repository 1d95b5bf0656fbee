"""Every change this app makes to MONAI Label's server, declared in one place and applied by one function.

Each :class:`Patch` says what it replaces in MONAI Label (or FastAPI), why, and whether it is a security fix.
:func:`install_all` runs once when the app starts inside the server: it compares the installed ``monailabel``
with the version these patches were written and tested for, applies each patch, and then checks that it really
took (the replaced function is in place *and* the route that should reach it still looks it up by that name).
A security patch that cannot apply stops the server with one line naming it (:class:`PatchFailed`, exit 2);
any other logs a warning and the server runs without it. ``/info`` lists the outcome (``patches``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib.server.server_process import in_server

logger = logging.getLogger(__name__)

TESTED_MONAILABEL_VERSION = "0.8.5"
# Every private attribute or method of MONAI Label that the app reads, sets, overrides or calls, by owner (a class
# path). The patch "monailabel_internals" checks each is still there at start; tests/test_patches.py checks that
# the app's code touches no other.
MONAILABEL_INTERNALS: dict[str, tuple[str, ...]] = {
    "monailabel.interfaces.app.MONAILabelApp": ("_infers", "_trainers", "_strategies"),
    "monailabel.datastore.local.LocalDatastore": (
        "_init_from_datastore_file",
        "_update_datastore_file",
        "_list_files",
        "_to_id",
        "_filename",
        "_datastore",
        "_datastore_path",
        "_datastore_config_path",
        "_config_ts",
        "_lock_file",
    ),
    "monailabel.datastore.dicom.DICOMWebDatastore": ("_client", "_fetch_by_frame", "_dicom_info"),
}


class PatchFailed(SystemExit):
    """A security patch could not be applied: the server must not start without it."""


class UntestedMonaiLabel(SystemExit):
    """The installed MONAI Label is not the version the patches were tested with, and no override is set."""


class PatchTargetMissing(Exception):
    """What a patch replaces is not where this MONAI Label version was known to keep it."""


@dataclass(frozen=True)
class PatchContext:
    """What the patches need from the app that installs them."""

    settings: Any  # monailabel.config.settings
    check_train: Callable[[str, Any], None]
    infer_workers: int
    dicomweb_timeout_s: float
    operations: Any = None  # lib.server.operations.OperationsSource
    on_image_opened: Callable[[str, str], None] | None = None  # (image id, source): lib.server.image_opened
    allow_untested_monailabel: bool = False  # --conf allow_untested_monailabel
    datastore: Callable[[], Any] | None = None  # the app's datastore (MONAILabelApp.datastore): lib.server.label_routes
    auth: Any = None  # lib.server.access_control.AuthOptions (--conf auth_audience, auth_issuer, api_keys_file)
    pacs_token_file: str = ""  # --conf pacs_token_file
    sessions: Callable[[str, str | None], int] | None = None  # the heartbeat: (image id, session) -> sessions kept


@dataclass(frozen=True)
class Patch:
    """One change to MONAI Label's server. ``apply`` returns False where it does not apply in this configuration
    (e.g. access control with authentication off) and raises :class:`PatchTargetMissing` where it cannot."""

    name: str
    replaces: str
    why: str
    security: bool
    apply: Callable[[PatchContext], bool]


@dataclass
class PatchReport:
    """What :func:`install_all` did: ``/info`` shows it as ``patches``."""

    monailabel_version: str
    tested_version: str = TESTED_MONAILABEL_VERSION
    untested_allowed: bool = False
    applied: list[str] = field(default_factory=list)
    not_needed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def version_matches(self) -> bool:
        return self.monailabel_version == self.tested_version

    def as_dict(self) -> dict[str, Any]:
        return {
            "monailabel": self.monailabel_version,
            "tested_with": self.tested_version,
            "version_matches": self.version_matches,
            "untested_allowed": self.untested_allowed,
            "applied": list(self.applied),
            "not_needed": list(self.not_needed),
            "failed": dict(self.failed),
        }


def looks_up(function: Any, name: str, module: Any) -> bool:
    """``function`` (a route handler) reads ``name`` from ``module``'s globals at call time, so replacing
    ``module.name`` reaches it."""
    function = getattr(function, "__wrapped__", function)
    code = getattr(function, "__code__", None)
    return code is not None and name in code.co_names and function.__globals__ is vars(module)


def require(condition: bool, missing: str) -> None:
    """Raise :class:`PatchTargetMissing` with ``missing`` unless ``condition`` holds."""
    if not condition:
        raise PatchTargetMissing(missing)


def _apply_request_guard(ctx: PatchContext) -> bool:
    from monailabel.endpoints import infer, train

    from lib.server import request_guard

    for module, handler, name in (
        (infer, "api_run_inference", "run_inference"),
        (train, "api_run_model", "run_model"),
        (train, "api_run", "run"),
    ):
        require(looks_up(getattr(module, handler, None), name, module), f"{module.__name__}.{handler} -> {name}")
    require(request_guard.install(ctx.check_train), "monailabel.endpoints infer/train")
    require(request_guard.is_installed(), "the guarded infer/train functions are not in place")
    return True


def _apply_task_guard(ctx: PatchContext) -> bool:
    from monailabel.endpoints import batch_infer, scoring, wsi_infer

    from lib.server import request_guard

    require(looks_up(scoring.api_run_method, "run_method", scoring), "monailabel.endpoints.scoring.api_run_method")
    require(looks_up(batch_infer.api_run, "run", batch_infer), "monailabel.endpoints.batch_infer.api_run")
    for handler in ("api_run_wsi_inference", "api_run_wsi_v2_inference"):
        require(looks_up(getattr(wsi_infer, handler, None), "run_wsi_inference", wsi_infer), f"wsi_infer.{handler}")
    require(request_guard.install_task_guard(), "scoring.run_method, batch_infer.run, wsi_infer.run_wsi_inference")
    return True


def _apply_access_control(ctx: PatchContext) -> bool:
    if not ctx.settings.MONAI_LABEL_AUTH_ENABLE:
        return False
    from monailabel.endpoints.user import auth

    from lib.server import access_control

    require(looks_up(auth.get_current_user, "from_token", auth), "monailabel.endpoints.user.auth.get_current_user")
    require(access_control.install(ctx.settings, ctx.auth), "monailabel.app middleware")
    require(access_control.is_installed(), "the token validator or the middleware is not in place")
    return True


def _apply_error_handlers(ctx: PatchContext) -> bool:
    from lib.server import error_handlers

    require(error_handlers.install(), "monailabel.app exception handlers")
    return True


def _apply_threaded_infer(ctx: PatchContext) -> bool:
    from lib.server import threaded_routes

    require(threaded_routes.serve_infer_in_threads(ctx.infer_workers), "POST /infer/{model}")
    return True


def _apply_threaded_datastore(ctx: PatchContext) -> bool:
    from lib.server import threaded_routes

    threaded_routes.serve_datastore_routes_in_threads()
    missing = threaded_routes.unthreaded_datastore_routes()
    require(not missing, ", ".join(f"{m} {p}" for m, p in missing))
    return True


def _apply_pacs_proxy(ctx: PatchContext) -> bool:
    from monailabel.endpoints import proxy

    from lib.server import pacs_proxy

    for handler in ("proxy_wado", "proxy_qido", "proxy_stow", "proxy"):
        require(looks_up(getattr(proxy, handler, None), "proxy_dicom", proxy), f"monailabel.endpoints.proxy.{handler}")
    require(
        pacs_proxy.install_pacs_proxy(ctx.dicomweb_timeout_s, ctx.pacs_token_file),
        "monailabel.endpoints.proxy.proxy_dicom",
    )
    return True


def _apply_saved_label_tag(ctx: PatchContext) -> bool:
    from monailabel.endpoints import datastore

    from lib.server import saved_label_tag

    require(looks_up(datastore.api_save_label, "save_label", datastore), "monailabel.endpoints.datastore.save_label")
    saved_label_tag.install()
    return True


def _apply_operations(ctx: PatchContext) -> bool:
    from lib.server import operations

    require(ctx.operations is not None, "the app's operations source")
    require(operations.install(ctx.operations), "monailabel.app routes and middleware")
    return True


def _apply_image_opened(ctx: PatchContext) -> bool:
    from lib.server import image_opened

    if ctx.on_image_opened is None:
        return False
    require(image_opened.install(ctx.on_image_opened), "monailabel.app middleware")
    return True


def _apply_ohif_viewer(ctx: PatchContext) -> bool:
    from monailabel.endpoints import ohif

    from lib.server import ohif_viewer

    require(looks_up(ohif.api_get_ohif, "get_ohif", ohif), "monailabel.endpoints.ohif.api_get_ohif -> get_ohif")
    client_id = ctx.auth.ohif_client_id if ctx.auth is not None else ""
    return ohif_viewer.install(ohif_viewer.ohif_login(ctx.settings, client_id))


def _apply_label_routes(ctx: PatchContext) -> bool:
    from lib.server import label_routes

    if ctx.datastore is None:
        return False
    require(label_routes.install(ctx.datastore), "monailabel.app routes")
    return True


def _apply_sessions(ctx: PatchContext) -> bool:
    from lib.server import session_routes

    require(ctx.sessions is not None, "the app's heartbeat")
    require(session_routes.install(ctx.sessions), "monailabel.app routes")
    return True


def _check_internals(ctx: PatchContext) -> bool:
    missing = [
        f"{owner}.{name}" for owner, names in MONAILABEL_INTERNALS.items() for name in names if not _has(owner, name)
    ]
    require(not missing, ", ".join(missing))
    return True


def _has(owner: str, name: str) -> bool:
    """``owner`` (a class path) has ``name``: as a class attribute, or stored by its ``__init__``."""
    module_name, class_name = owner.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    return hasattr(cls, name) or name in cls.__init__.__code__.co_names


def _apply_log_privacy(ctx: PatchContext) -> bool:
    from lib.server import log_privacy

    app_dir = ctx.settings.MONAI_LABEL_APP_DIR
    require(log_privacy.install(f"{app_dir}/model" if app_dir else None), "the logging handlers of logging.json")
    require(log_privacy.is_installed(), "a logging handler without the scrubbing formatter")
    return True


PATCHES: tuple[Patch, ...] = (
    Patch(
        "request_guard",
        "monailabel.endpoints.infer.run_inference, monailabel.endpoints.train.run_model and .run",
        "hostile /infer params (path-like ids, label tags, session ids, upload names) and /train bodies got a 500, "
        "a file outside the datastore, or a training run that crashes; now a 4xx before anything runs",
        security=True,
        apply=_apply_request_guard,
    ),
    Patch(
        "task_guard",
        "monailabel.endpoints.scoring.run_method, batch_infer.run and wsi_infer.run_wsi_inference",
        "an unknown scoring method, or batch inference with an interactive model (no prompts to run), started "
        "a subprocess that then failed (ZeroDivisionError without a GPU), and whole-slide inference answered "
        "500; now a 404/422 before anything starts",
        security=False,
        apply=_apply_task_guard,
    ),
    Patch(
        "access_control",
        "monailabel.endpoints.user.auth.from_token; an ASGI middleware in monailabel.app",
        "with authentication on, MONAI Label refuses every token (PyJWT 2), leaves /reload open and lets "
        "annotators replace the model; now tokens are validated here and every non-public path needs one",
        security=True,
        apply=_apply_access_control,
    ),
    Patch(
        "error_handlers",
        "monailabel.app exception handlers",
        "the app's errors (and MONAI Label's own) become a 4xx/5xx with a detail that says what to change, "
        "not a 500 with a stack trace",
        security=False,
        apply=_apply_error_handlers,
    ),
    Patch(
        "threaded_infer_route",
        "the POST /infer/{model} route of monailabel.app",
        "MONAI Label runs inference on the event loop: one request blocks every other (even /info); now in "
        "threads behind the admission gate",
        security=False,
        apply=_apply_threaded_infer,
    ),
    Patch(
        "threaded_datastore_routes",
        "the datastore and active-learning routes of monailabel.app",
        "async handlers that block on the datastore: a slow PACS held up the whole server",
        security=False,
        apply=_apply_threaded_datastore,
    ),
    Patch(
        "pacs_proxy",
        "monailabel.endpoints.proxy.proxy_dicom",
        "OHIF's DICOMweb proxy had no timeout and blocked the event loop; now in threads, timed out, 503",
        security=False,
        apply=_apply_pacs_proxy,
    ),
    Patch(
        "saved_label_tag",
        "monailabel.endpoints.datastore.save_label",
        "MONAI Label's on_save_label is not told the label tag; auto-retrain counts final labels only",
        security=False,
        apply=_apply_saved_label_tag,
    ),
    Patch(
        "operations",
        "monailabel.app: GET /metrics, /health/live, /health/ready and an outermost ASGI middleware",
        "MONAI Label has no metrics or health endpoints and no request ids: an operator had nothing to watch "
        "and a load balancer nothing to probe",
        security=False,
        apply=_apply_operations,
    ),
    Patch(
        "image_opened",
        "an ASGI middleware in monailabel.app (watches GET /datastore/image and the DICOMweb proxy)",
        "MONAI Label does not tell an app which image a viewer opened: the first click paid the whole image "
        "encoding; now the app encodes it in the background while the annotator looks at it",
        security=False,
        apply=_apply_image_opened,
    ),
    Patch(
        "ohif_viewer",
        "monailabel.endpoints.ohif.get_ohif",
        "the OHIF bundled with MONAI Label sends clicks only; /ohif/ now serves OHIF's release with the MedSAM2 "
        "panel (boxes, scribbles, lasso, undo, per-slice confidence); not applied when it is not installed",
        security=False,
        apply=_apply_ohif_viewer,
    ),
    Patch(
        "label_routes",
        "monailabel.app: GET /medsam2/labels/{image_id} and POST /medsam2/labels/{image_id}/names",
        "MONAI Label keeps one label per tag (a save overwrites it) and a label list fixed at start; now the names "
        "added to an image are kept on disk for every client, and every saved version (local tags, DICOM SEG "
        "series) is listed with the refine_from value that refines it (docs/api.md)",
        security=False,
        apply=_apply_label_routes,
    ),
    Patch(
        "sessions",
        "monailabel.app: POST /medsam2/heartbeat",
        "MONAI Label has no way for a viewer to say a study is still open; the app's idle timeout "
        "(--conf session_idle_timeout_s) would drop the sessions of an annotator who looks without clicking",
        security=False,
        apply=_apply_sessions,
    ),
    Patch(
        "monailabel_internals",
        "the private attributes and methods of MONAI Label the app reads, overrides or calls (MONAILABEL_INTERNALS): "
        + "; ".join(f"{owner.rsplit('.', 1)[1]}: {', '.join(names)}" for owner, names in MONAILABEL_INTERNALS.items()),
        "the crash-safe local datastore (MONAI Label writes its index and labels in place: a crash mid-write loses "
        "them), the DICOMweb datastore with SEG labels, the train/next-sample checks and the batch/whole-slide "
        "guard rely on them; a MONAI Label that renamed one must not start",
        security=True,
        apply=_check_internals,
    ),
    Patch(
        "log_privacy",
        "every logging handler MONAI Label configures (logging.json)",
        "MONAI Label logs series info with the PatientID (e.g. every next sample) into logs/app.log, served by "
        "GET /logs/; now identifying DICOM values become pseudonyms in every log line",
        security=True,
        apply=_apply_log_privacy,
    ),
)


def _check_version(report: PatchReport, allowed: bool) -> None:
    """An untested MONAI Label stops the start (:class:`UntestedMonaiLabel`) unless the override is set."""
    if report.version_matches:
        return
    v, tested = report.monailabel_version, report.tested_version
    if not allowed:
        raise UntestedMonaiLabel(
            f"MONAI Label {v} is installed, but this app's changes to its server were tested with {tested} only: "
            f"install monailabel=={tested}, or start with --conf allow_untested_monailabel true to run it anyway "
            "(see docs/monailabel_patches.md)."
        )
    report.untested_allowed = True
    logger.warning("MONAI Label %s is installed; tested with %s (--conf allow_untested_monailabel true)", v, tested)


def install_all(ctx: PatchContext, patches: tuple[Patch, ...] = PATCHES) -> PatchReport:
    """Apply every patch (inside the server only) and return what happened; raises :class:`UntestedMonaiLabel`
    for an untested MONAI Label without the override, :class:`PatchFailed` when a security patch cannot apply."""
    import monailabel

    report = PatchReport(monailabel_version=monailabel.__version__)
    if not in_server():
        return report
    _check_version(report, ctx.allow_untested_monailabel)
    for patch in patches:
        try:
            (report.applied if patch.apply(ctx) else report.not_needed).append(patch.name)
        except Exception as e:  # any failure of a patch is reported the same way
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, PatchTargetMissing) else f"not found: {e}"
            report.failed[patch.name] = reason
            if patch.security:
                raise PatchFailed(
                    f"the security patch {patch.name!r} ({patch.replaces}) could not be applied to MONAI Label "
                    f"{report.monailabel_version} ({reason}); install monailabel=={report.tested_version}."
                ) from None
            logger.warning("Patch %r not applied (%s): %s", patch.name, patch.replaces, reason)
    logger.info("MONAI Label %s patched: %s", report.monailabel_version, ", ".join(report.applied) or "none")
    return report
