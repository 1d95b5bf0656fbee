"""Serve this app's OHIF at ``/ohif/``: OHIF's prebuilt release (``scripts/install_ohif.py``) with the MedSAM2
panel (``apps/medsam2/ohif/``) in place of the OHIF build bundled in the monailabel wheel.

MONAI Label's ``GET /ohif/{path}`` route (and its access check) stays; only the function that maps a path to a
file is replaced. Files of the app's own OHIF folder (``app-config.js``, the panel bundle) come first, then the
installed release; any other path is the single-page app's ``index.html``. A path that leaves those folders is
answered 404. When the release is not installed, MONAI Label's bundled viewer keeps being served.

With login on and ``--conf ohif_client_id``, ``app-config.js`` gains OHIF's own ``oidc`` setting: OHIF logs its
user in at the server's identity provider (authorization code with PKCE) and sends that token with its requests.
"""

from __future__ import annotations

import json
import logging
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from lib.errors import NotFound

logger = logging.getLogger(__name__)

OHIF_DIR = Path(__file__).resolve().parents[2] / "ohif"
VIEWER_DIR = OHIF_DIR / "viewer"
PANEL_FILES = {
    "app-config.js": OHIF_DIR / "app-config.js",
    "medsam2-ohif.js": OHIF_DIR / "dist" / "medsam2-ohif.js",
    "medsam2-mode.js": OHIF_DIR / "medsam2-mode.js",
}
NO_CACHE = {"Cache-Control": "no-cache"}


@dataclass(frozen=True)
class OhifLogin:
    """OHIF's own login: the provider (its discovery document is at ``<authority>/.well-known/...``) and the
    public client OHIF is registered as there."""

    authority: str
    client_id: str

    def config_lines(self) -> str:
        """What ``app-config.js`` gains: OHIF's ``oidc`` setting (redirect URIs relative to ``/ohif``)."""
        oidc = {
            "authority": self.authority,
            "client_id": self.client_id,
            "redirect_uri": "/callback",
            "post_logout_redirect_uri": "/",
            "response_type": "code",
            "scope": "openid",
        }
        comment = "// added by the server (--conf ohif_client_id): OHIF logs its users in"
        return f"\n{comment}\nwindow.config.oidc = [{json.dumps(oidc)}];\n"


_login: OhifLogin | None = None


def ohif_login(settings, client_id: str) -> OhifLogin | None:
    """OHIF's login from MONAI Label's settings and ``--conf ohif_client_id``; None without one (a client id
    with login off is ignored, and said so)."""
    if not client_id:
        return None
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        logger.warning("--conf ohif_client_id is ignored: login is off (MONAI_LABEL_AUTH_ENABLE)")
        return None
    return OhifLogin(str(settings.MONAI_LABEL_AUTH_REALM_URI).rstrip("/"), client_id)


def viewer_installed(viewer: Path = VIEWER_DIR) -> bool:
    """True when the OHIF release is installed and the panel is built."""
    return (viewer / "index.html").is_file() and all(p.is_file() for p in PANEL_FILES.values())


def viewer_file(path: str, viewer: Path = VIEWER_DIR) -> Path:
    """The file to answer ``GET /ohif/<path>`` with."""
    path = path.strip("/")
    if path in PANEL_FILES:
        return PANEL_FILES[path]
    if not path:
        return viewer / "index.html"
    root = viewer.resolve()
    try:
        candidate = (root / path).resolve()
        inside = candidate.is_relative_to(root)
        found = inside and candidate.is_file()
    except (OSError, ValueError):  # NUL bytes, names too long for the file system
        inside = False
    if not inside:
        raise NotFound("No such file in the OHIF viewer.")
    if found:
        return candidate
    if "." in candidate.name:  # a missing asset, not one of the viewer's routes
        raise NotFound(f"No such file in the OHIF viewer: {path[:200]}")
    return viewer / "index.html"


def get_ohif(path: str):
    """Replacement of ``monailabel.endpoints.ohif.get_ohif``."""
    from fastapi.responses import FileResponse, Response

    file = viewer_file(path)
    if _login is not None and file == PANEL_FILES["app-config.js"]:
        config = file.read_text(encoding="utf-8") + _login.config_lines()
        return Response(config, media_type="text/javascript", headers=NO_CACHE)
    media_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    if file.suffix in (".js", ".mjs"):
        media_type = "text/javascript"
    headers = NO_CACHE if file.name in ("index.html", *PANEL_FILES) else None
    return FileResponse(file, media_type=media_type, headers=headers)


def install(login: OhifLogin | None = None) -> bool:
    """Serve this app's OHIF (with its own ``login``, if any); False (MONAI Label's bundled viewer stays) when it
    is not installed."""
    from monailabel.endpoints import ohif

    global _login
    _login = login
    if not viewer_installed():
        logger.warning(
            "The MedSAM2 OHIF viewer is not installed (run scripts/setup.sh or scripts/install_ohif.py); "
            "/ohif/ serves the viewer bundled with MONAI Label, without the MedSAM2 panel."
        )
        return False
    ohif.get_ohif = get_ohif
    return ohif.get_ohif is get_ohif
