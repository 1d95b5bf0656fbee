"""The OHIF the app serves at /ohif/ (``lib/server/ohif_viewer.py``), its install from the npm release
(``scripts/install_ohif.py``) and the committed panel bundle (``scripts/build_ohif_panel.sh``): no browser."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from sam2_testing import APP_DIR

REPO = APP_DIR.parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import install_ohif  # noqa: E402

from lib.errors import NotFound  # noqa: E402
from lib.server import ohif_viewer  # noqa: E402

INDEX = (
    '<script>window.PUBLIC_URL="/"</script><script src="/app-config.js"></script>'
    '<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"</script>'
    '<link href="/app.bundle.css"><script defer src="/app.bundle.abc.js"></script><a href="//cdn.example/x">'
)


def fake_release(tmp_path: Path, app_bundle: str = 'var x;__webpack_require__.p = "/";') -> dict:
    """A tarball shaped like @ohif/app's (package/dist/...), with its pinned integrity."""
    files = {
        "package/dist/index.html": INDEX,
        "package/dist/app.bundle.abc.js": app_bundle,
        "package/dist/worker.bundle.js": '__webpack_require__.p = "/";',
        "package/dist/app.bundle.css": "@font-face{src:url(/f.woff2)}",
        "package/dist/manifest.json": '{"icons": [{"src": "/assets/a.png"}]}',
        "package/dist/app-config.js": "window.config = {};",
        "package/dist/ort/huge.wasm": "x",
        "package/README.md": "readme",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "app.tgz"
    path.write_bytes(buffer.getvalue())
    digest = __import__("base64").b64encode(hashlib.sha512(buffer.getvalue()).digest()).decode()
    return {
        "package": "@ohif/app",
        "version": "0.0.0",
        "tarball": path.as_uri(),
        "integrity": f"sha512-{digest}",
        "skip": ["dist/ort/"],
    }


def test_install_moves_the_release_to_ohif_and_keeps_only_what_is_served(tmp_path):
    viewer = tmp_path / "viewer"
    install_ohif.install(fake_release(tmp_path), viewer)
    index = (viewer / "index.html").read_text()
    assert 'window.PUBLIC_URL="/ohif/"' in index and 'window.PUBLIC_URL="/"' not in index
    assert 'src="/ohif/app-config.js"' in index and 'href="/ohif/app.bundle.css"' in index
    assert 'href="//cdn.example/x"' in index  # protocol-relative URLs are not ours to move
    for bundle in ("app.bundle.abc.js", "worker.bundle.js"):
        assert '__webpack_require__.p = "/ohif/"' in (viewer / bundle).read_text()
    assert "url(/ohif/f.woff2)" in (viewer / "app.bundle.css").read_text()
    assert '"src": "/ohif/assets/a.png"' in (viewer / "manifest.json").read_text()
    assert not (viewer / "ort").exists() and not (viewer / "app-config.js").exists()
    assert install_ohif.installed_version(viewer) == "@ohif/app@0.0.0"


def test_install_refuses_a_tarball_that_is_not_the_pinned_one(tmp_path):
    release = fake_release(tmp_path)
    release["integrity"] = "sha512-" + "A" * 86 + "=="
    with pytest.raises(install_ohif.InstallError, match="is not the pinned"):
        install_ohif.install(release, tmp_path / "viewer")
    assert not (tmp_path / "viewer").exists()


def test_install_stops_when_the_public_path_is_not_where_it_was(tmp_path):
    """A release whose app bundle no longer sets its public path the way this script expects: nothing is
    installed (a half-moved viewer would load its chunks from the web root)."""
    viewer = tmp_path / "viewer"
    viewer.mkdir()
    (viewer / "index.html").write_text("the installed one")
    with pytest.raises(install_ohif.InstallError, match="public path"):
        install_ohif.install(fake_release(tmp_path, app_bundle="var x;"), viewer)
    assert (viewer / "index.html").read_text() == "the installed one"


def test_pinned_release_keeps_ohifs_own_segmentation_files():
    """OHIF's in-browser AI files (``dist/ort/``: Labelmap Assist, One Click Segment) stay installed beside the
    panel; an install that skipped them is not the pinned one (it is replaced)."""
    release = json.loads(install_ohif.RELEASE_FILE.read_text())
    assert not any(s.startswith("dist/ort") for s in release.get("skip", []))
    assert "skip: \n" in install_ohif.stamp_text({**release, "skip": []})
    assert install_ohif.stamp_text({**release, "skip": ["dist/ort/"]}) != install_ohif.stamp_text(release)


def test_pinned_release_is_an_exact_npm_version_with_its_integrity():
    release = json.loads(install_ohif.RELEASE_FILE.read_text())
    assert release["tarball"] == f"https://registry.npmjs.org/@ohif/app/-/app-{release['version']}.tgz"
    assert release["integrity"].startswith("sha512-")


@pytest.fixture
def viewer(tmp_path) -> Path:
    (tmp_path / "index.html").write_text("index")
    (tmp_path / "app.bundle.1.js").write_text("bundle")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "logo.png").write_bytes(b"png")
    return tmp_path


@pytest.mark.parametrize(
    ("path", "served"),
    [
        ("", "index.html"),
        ("app.bundle.1.js", "app.bundle.1.js"),
        ("assets/logo.png", "assets/logo.png"),
        ("medsam2", "index.html"),  # the viewer's routes are the single-page app
        ("medsam2/dicomweb", "index.html"),
    ],
)
def test_viewer_files_and_routes(viewer, path, served):
    assert ohif_viewer.viewer_file(path, viewer) == (viewer / served).resolve() or served == "index.html"
    assert ohif_viewer.viewer_file(path, viewer).read_bytes() == (viewer / served).read_bytes()


def test_the_panel_files_come_from_the_app(viewer):
    for name, source in ohif_viewer.PANEL_FILES.items():
        assert ohif_viewer.viewer_file(name, viewer) == source
        assert source.is_file(), f"{source} is committed"


@pytest.mark.parametrize(
    "path", ["../secret.txt", "assets/../../secret.txt", "missing.js", "assets/none.png", "a\x00b.js", "x" * 5000]
)
def test_paths_outside_the_viewer_or_missing_files_are_404(viewer, path):
    (viewer.parent / "secret.txt").write_text("no")
    with pytest.raises(NotFound):
        ohif_viewer.viewer_file(path, viewer)


def test_app_config_loads_the_panel_and_uses_the_servers_dicomweb_proxy():
    config = ohif_viewer.PANEL_FILES["app-config.js"].read_text()
    assert "routerBasename: '/ohif'," in config  # not '/ohif/': OHIF's login would miss its callback route
    assert "extensions: ['/ohif/medsam2-ohif.js']" in config and "modes: ['/ohif/medsam2-mode.js']" in config
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert f"{root}: '/proxy/dicom/" in config


@pytest.mark.slow
def test_committed_panel_bundle_is_the_build_of_its_sources(tmp_path):
    """``scripts/build_ohif_panel.sh``'s output, built again from the pinned packages, is the committed file."""
    npm = shutil.which("npm")
    if npm is None:  # .ci/run installs it (scripts/install_pacs_tools.sh)
        (pytest.fail if os.environ.get("MEDSAM2_REQUIRE_PACS") == "1" else pytest.skip)("Node.js/npm is not installed")
    panel = APP_DIR / "ohif" / "panel"
    work = tmp_path / "panel"
    shutil.copytree(panel, work, ignore=shutil.ignore_patterns("node_modules"))
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=work, check=True, capture_output=True, timeout=600)
    out = tmp_path / "built.js"
    script = json.loads((work / "package.json").read_text())["scripts"]["build"]
    script = script.replace("--outfile=../dist/medsam2-ohif.js", f"--outfile={out}")
    assert str(out) in script
    subprocess.run(
        script,
        shell=True,
        cwd=work,
        check=True,
        capture_output=True,
        timeout=300,
        env={"PATH": f"{work / 'node_modules' / '.bin'}:/usr/bin:/bin"},
    )
    assert (
        out.read_bytes() == ohif_viewer.PANEL_FILES["medsam2-ohif.js"].read_bytes()
    ), "the committed panel bundle is not the build of its sources: run scripts/build_ohif_panel.sh"


def test_with_ohifs_own_login_the_served_config_names_the_provider_and_client(monkeypatch, caplog):
    on = SimpleNamespace(MONAI_LABEL_AUTH_ENABLE=True, MONAI_LABEL_AUTH_REALM_URI="https://idp.example/realms/h/")
    monkeypatch.setattr(ohif_viewer, "_login", ohif_viewer.ohif_login(on, "ohif-viewer"))
    served = ohif_viewer.get_ohif("app-config.js").body.decode()
    assert served.startswith(ohif_viewer.PANEL_FILES["app-config.js"].read_text())
    oidc = json.loads(re.search(r"window\.config\.oidc = \[(.*)\];", served).group(1))
    assert oidc["authority"] == "https://idp.example/realms/h" and oidc["client_id"] == "ohif-viewer"
    assert oidc["response_type"] == "code" and oidc["redirect_uri"] == "/callback"
    off = SimpleNamespace(MONAI_LABEL_AUTH_ENABLE=False, MONAI_LABEL_AUTH_REALM_URI="")
    assert ohif_viewer.ohif_login(off, "ohif-viewer") is None and "ignored: login is off" in caplog.text
    assert ohif_viewer.ohif_login(on, "") is None
    monkeypatch.setattr(ohif_viewer, "_login", None)
    assert "window.config.oidc" not in Path(ohif_viewer.get_ohif("app-config.js").path).read_text()


@pytest.mark.parametrize("data_filter", [True, False], ids=["python's data filter", "python 3.11.2, without it"])
def test_downloaded_archives_cannot_write_outside_their_folder(tmp_path, monkeypatch, data_filter):
    import safe_tar

    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("dist/ok.js", "../evil.js"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        link = tarfile.TarInfo("dist/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        ok, evil, link = tar.getmembers()
        safe_tar.safe_extract(tar, tmp_path / "into", [ok])
        assert (tmp_path / "into" / "dist" / "ok.js").read_bytes() == b"x"
        for bad in (evil, link):
            with pytest.raises((safe_tar.UnsafeMember, tarfile.FilterError)):
                safe_tar.safe_extract(tar, tmp_path / "into", [bad])
    assert not (tmp_path / "evil.js").exists() and not (tmp_path / "into" / "dist" / "link").exists()
