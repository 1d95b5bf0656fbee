"""Try the PACS deployment on one machine: a local Orthanc (DICOMweb) holding the demo's lung CT as a DICOM
series, and the app serving it from there, with final labels saved back to Orthanc as DICOM SEG.

    python scripts/pacs_demo.py [--folder demo/pacs] [--orthanc-port 8042] [--port 8000] [start_server args]

Orthanc keeps its storage in ``<folder>/orthanc`` (so saved SEGs survive a restart) and listens on 127.0.0.1
only; it is stopped when the server stops. OHIF: http://127.0.0.1:<port>/ohif/ .
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import requests
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from dicom_series import write_ct_series  # noqa: E402
from local_orthanc import DICOMWEB_PLUGIN, ORTHANC, LocalOrthanc  # noqa: E402
from prepare_demo import fetch_archive  # noqa: E402

CASES = {"lung1": "MEDSAM2-DEMO-1", "lung2": "MEDSAM2-DEMO-2"}


def write_demo_series(out: Path) -> list[Path]:
    """The archive's lung CTs as CT series (fixed UIDs: writing them again gives the same instances)."""
    files: list[Path] = []
    archive = fetch_archive(REPO / ".cache" / "demo")
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory() as tmp:
        for case, patient in CASES.items():
            folder = out / case
            if not (folder.is_dir() and any(folder.iterdir())):
                member = next(m for m in tar.getmembers() if m.name.endswith(f"data/{case}_image.nrrd"))
                member.name = f"{case}.nrrd"
                tar.extract(member, tmp, filter="data")
                image = sitk.Cast(sitk.ReadImage(str(Path(tmp) / member.name)), sitk.sitkInt16)
                write_ct_series(image, folder, patient_id=patient, uid_seed=f"medsam2-demo-{case}", description=case)
            files += sorted(folder.glob("*.dcm"))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=REPO / "demo" / "pacs")
    ap.add_argument("--orthanc-port", type=int, default=8042)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--host", default="127.0.0.1")
    args, server_args = ap.parse_known_args(argv)
    for needed in (ORTHANC, DICOMWEB_PLUGIN):
        if not os.path.exists(needed):
            raise SystemExit(f"{needed} missing: install Orthanc first (sudo bash scripts/install_pacs_tools.sh)")
    files = write_demo_series(args.folder / "series")
    orthanc = LocalOrthanc(args.folder / "orthanc", args.orthanc_port, name="MEDSAM2-DEMO-PACS").start()
    try:
        known = requests.get(f"{orthanc.url}/instances", timeout=30).json()
        if len(known) < len(files):
            orthanc.upload(files)
        print(f"Orthanc (DICOMweb): {orthanc.dicomweb} with {len(files)} CT instances", flush=True)
        if not any(a == "checkpoint" for a in server_args):
            server_args += ["--conf", "checkpoint", os.environ.get("MEDSAM2_CHECKPOINT", "MedSAM2_latest")]
        env = {**os.environ, "MONAI_LABEL_DATASTORE_CACHE_PATH": str(args.folder / "cache")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        cmd = ["monailabel", "start_server", "--app", str(REPO / "apps" / "medsam2")]
        cmd += ["--studies", orthanc.dicomweb, "--host", args.host, "--port", str(args.port), *server_args]
        print(f"OHIF: http://{args.host}:{args.port}/ohif/   Slicer: server http://{args.host}:{args.port}", flush=True)

        server = subprocess.Popen(cmd, env=env, cwd=str(REPO))

        def stop_server(signum, frame):  # SIGTERM/SIGINT: stop the server, then Orthanc (finally below)
            server.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop_server)
        signal.signal(signal.SIGINT, stop_server)
        return server.wait()
    finally:
        orthanc.stop()


if __name__ == "__main__":
    sys.exit(main())
