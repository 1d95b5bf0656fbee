"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin on loopback, temporary storage, and a CT
series written from the real lung CT of pyradiomics-bhklab's source archive (one DICOM file per slice)."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import SimpleITK as sitk

from sam2_testing import APP_DIR

REPO = APP_DIR.parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from dicom_series import CtSeries, write_ct_series  # noqa: E402, F401  (the tests import them from here)
from local_orthanc import DICOMWEB_PLUGIN, ORTHANC, LocalOrthanc, free_port  # noqa: E402, F401
from safe_tar import safe_extract  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# .ci/run sets this: there a missing Orthanc or Chromium is a failure, not a skip
REQUIRED = os.environ.get("MEDSAM2_REQUIRE_PACS") == "1"


def require(paths: list[str], what: str) -> None:
    """Skip (or fail under .ci/run) when a system package the test needs is not installed."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        message = f"{what} not installed ({', '.join(missing)}); sudo bash scripts/install_pacs_tools.sh"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)


class Orthanc(LocalOrthanc):
    """The tests' Orthanc: skipped (failed under .ci/run) when the Debian packages are not installed."""

    def __init__(self, folder: Path, http_port: int | None = None, **config):
        require([ORTHANC, DICOMWEB_PLUGIN], "Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb)")
        super().__init__(folder, http_port, name="MEDSAM2-TEST-PACS", **config)


PYTHON_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPython.so"
BEARER_FILTER = """import orthanc


def bearer_only(uri, **request):
    with open({token_file!r}) as f:
        token = f.read().strip()
    return request.get("headers", {{}}).get("authorization") == "Bearer " + token


orthanc.RegisterIncomingHttpRequestFilter(bearer_only)
"""


class TokenOrthanc(Orthanc):
    """An Orthanc that answers only requests with ``Authorization: Bearer <the token in token_file>`` (others:
    403), through its own HTTP request filter (Orthanc's Python plugin, ``RegisterIncomingHttpRequestFilter``, the
    hook its authorization plugin uses); the file is read at every request, so writing it rotates the token."""

    def __init__(self, folder: Path, token_file: Path):
        require([PYTHON_PLUGIN], "Orthanc's Python plugin (Debian orthanc-python)")
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "bearer_only.py"
        script.write_text(BEARER_FILTER.format(token_file=str(token_file)))
        super().__init__(folder, plugins=(PYTHON_PLUGIN,), PythonScript=str(script))
        self.token_file = token_file
        self.use_token()

    def use_token(self) -> None:
        """This object's own requests (uploads, searches) with the token in the file now."""
        self.http.headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"


def lung_ct(first_slice: int = 18, num_slices: int = 20, size: int = 256) -> sitk.Image:
    """A slab of pyradiomics' lung2 CT (real pixels, HU) through its labelled nodule, in-plane shrunk to ``size``
    (keeps the tests fast; the geometry stays consistent: spacing grows by the same factor)."""
    from prepare_demo import fetch_archive

    archive = fetch_archive(REPO / ".cache" / "demo")
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory() as tmp:
        member = next(m for m in tar.getmembers() if m.name.endswith("data/lung2_image.nrrd"))
        member.name = "lung2_image.nrrd"
        safe_extract(tar, tmp, [member])
        image = sitk.ReadImage(str(Path(tmp) / member.name))
    image = image[:, :, first_slice : first_slice + num_slices]
    if size and image.GetSize()[0] != size:
        factor = image.GetSize()[0] // size
        image = sitk.BinShrink(image, [factor, factor, 1])
    return sitk.Cast(image, sitk.sitkInt16)
