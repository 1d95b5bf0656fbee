"""Install the OHIF viewer the app serves at /ohif/: OHIF's own prebuilt release from the npm registry (the
``@ohif/app`` package, pinned with its integrity hash in ``apps/medsam2/ohif/ohif_release.json``), unpacked into
``apps/medsam2/ohif/viewer/`` and moved from the web root to ``/ohif/``.

No Node.js is needed: the tarball is fetched over HTTPS and checked against the pinned sha512. OHIF's build
hard-codes its public path ``/``; the rewrite below is the documented way of serving a built OHIF under a
sub-path (its ``PUBLIC_URL``), done on exact strings and checked: if a string is not where this release keeps
it, the install stops instead of serving a half-moved viewer. The panel (our extension and mode) is not part of
this download: the server serves it from ``apps/medsam2/ohif/`` (built by ``scripts/build_ohif_panel.sh``).

Usage: ``python scripts/install_ohif.py [--force]``; exits 0 when the pinned release is already installed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path

from safe_tar import safe_extract

OHIF_DIR = Path(__file__).resolve().parents[1] / "apps" / "medsam2" / "ohif"
RELEASE_FILE = OHIF_DIR / "ohif_release.json"
VIEWER_DIR = OHIF_DIR / "viewer"
STAMP = ".medsam2-release"
BASE = "/ohif/"


class InstallError(Exception):
    """The release could not be fetched, verified or moved to /ohif/."""


def fetch_release(release: dict, timeout_s: float = 120) -> bytes:
    """The release tarball, verified against its pinned npm integrity (sha512)."""
    with urllib.request.urlopen(release["tarball"], timeout=timeout_s) as answer:
        data = answer.read()
    algorithm, _, expected = release["integrity"].partition("-")
    got = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if got != expected:
        raise InstallError(f"{release['tarball']}: {algorithm} {got} is not the pinned {expected}")
    return data


def unpack_dist(data: bytes, skip: list[str], into: Path) -> None:
    """The package's ``dist/`` folder (less the ``skip`` prefixes) into ``into``."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = []
        for member in tar.getmembers():
            name = member.name.removeprefix("package/")
            if not name.startswith("dist/") or any(name.startswith(s) for s in skip):
                continue
            member.name = name.removeprefix("dist/")
            members.append(member)
        safe_extract(tar, into, members)


def replace_exactly(path: Path, old: str, new: str, at_least: int = 1) -> None:
    """Replace every ``old`` in ``path``; stop if there are fewer than ``at_least``."""
    text = path.read_text(encoding="utf-8")
    count = text.count(old)
    if count < at_least:
        raise InstallError(f"{path.name}: expected {old!r} at least {at_least} time(s), found {count}")
    path.write_text(text.replace(old, new), encoding="utf-8")


def move_to_base(viewer: Path) -> None:
    """Point the built viewer's absolute URLs (``/``) at ``/ohif/``."""
    index = viewer / "index.html"
    replace_exactly(index, 'window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{BASE}"', at_least=2)
    text = index.read_text(encoding="utf-8")
    text, moved = re.subn(r'(src|href)="/(?!/)', rf'\1="{BASE}', text)
    if moved < 3:
        raise InstallError(f"index.html: only {moved} absolute src/href found")
    index.write_text(text, encoding="utf-8")
    public_path = '__webpack_require__.p = "/"'
    moved_bundles = []
    for bundle in viewer.glob("*.js"):  # the app and its workers each set webpack's public path
        text = bundle.read_text(encoding="utf-8")
        if public_path in text:
            bundle.write_text(text.replace(public_path, f'__webpack_require__.p = "{BASE}"'), encoding="utf-8")
            moved_bundles.append(bundle.name)
    if not any(name.startswith("app.bundle.") for name in moved_bundles):
        raise InstallError("app.bundle.*.js: its webpack public path is not where this release keeps it")
    replace_exactly(viewer / "manifest.json", '"src": "/assets/', f'"src": "{BASE}assets/')
    for css in viewer.glob("*.css"):
        text = css.read_text(encoding="utf-8")
        css.write_text(text.replace("url(/", f"url({BASE}"), encoding="utf-8")
    (viewer / "app-config.js").unlink(missing_ok=True)  # the app serves its own (apps/medsam2/ohif/app-config.js)


def installed_version(viewer: Path = VIEWER_DIR) -> str | None:
    """The release installed in ``viewer``, or None."""
    stamp = viewer / STAMP
    return stamp.read_text().splitlines()[0].strip() if stamp.is_file() else None


def stamp_text(release: dict) -> str:
    """What an install of ``release`` writes in its stamp: the release, and what of it was left out (an install
    that skipped other files, e.g. OHIF's in-browser AI files ``dist/ort/``, is not this one)."""
    return f"{release['package']}@{release['version']}\nskip: {' '.join(sorted(release.get('skip', [])))}\n"


def is_installed(release: dict, viewer: Path = VIEWER_DIR) -> bool:
    stamp = viewer / STAMP
    return stamp.is_file() and stamp.read_text() == stamp_text(release)


def install(release: dict, viewer: Path = VIEWER_DIR) -> None:
    """Fetch, verify, unpack and move the release; replaces ``viewer`` only once all of that worked."""
    data = fetch_release(release)
    with tempfile.TemporaryDirectory(dir=viewer.parent, prefix=".viewer-") as tmp:
        staged = Path(tmp) / "viewer"
        unpack_dist(data, release.get("skip", []), staged)
        move_to_base(staged)
        (staged / STAMP).write_text(stamp_text(release))
        old = Path(tmp) / "old"
        if viewer.exists():
            viewer.rename(old)  # the old viewer stays whole until the new one is in place
        try:
            staged.rename(viewer)
        except OSError:
            if old.exists():
                old.rename(viewer)
            raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if the pinned release is there")
    args = parser.parse_args()
    release = json.loads(RELEASE_FILE.read_text())
    wanted = f"{release['package']}@{release['version']}"
    if is_installed(release) and not args.force:
        print(f"install_ohif: {wanted} is installed")
        return 0
    try:
        install(release)
    except (OSError, InstallError, tarfile.TarError, zlib.error, EOFError, ValueError) as e:
        print(f"install_ohif: could not install {wanted}: {e}", file=sys.stderr)
        return 1
    print(f"install_ohif: {wanted} installed in {VIEWER_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
