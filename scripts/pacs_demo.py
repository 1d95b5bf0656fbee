"""The demo next to a PACS, on one machine: a local Orthanc (DICOMweb) holding the demo studies as DICOM series,
and the app serving them from there, with final labels saved back to Orthanc as DICOM SEG. ``scripts/start_demo.sh``
(the README's first command) runs this once Orthanc is installed.

    python scripts/pacs_demo.py [--studies demo/studies] [--folder demo/pacs] [--orthanc-port 8042] [--port 8000]
                                [start_server args]

The studies folder (NIfTI, as ``scripts/prepare_demo.py`` writes it; prepared here when missing) is converted to
one DICOM series per study (CT when the image holds HU values, else MR; fixed UIDs, so converting again gives the
same instances). Orthanc keeps its storage in ``<folder>/orthanc`` (saved SEGs survive a restart) and listens on
127.0.0.1 only; it is stopped when the server stops. OHIF: http://127.0.0.1:<port>/ohif/ .
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import requests
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from dicom_series import write_ct_series  # noqa: E402
from local_orthanc import DICOMWEB_PLUGIN, ORTHANC, LocalOrthanc  # noqa: E402

# the patient ids the lung cases had before the other studies were added (their UIDs come from the case name)
PATIENTS = {"lung1": "MEDSAM2-DEMO-1", "lung2": "MEDSAM2-DEMO-2"}
AIR_HU = -500.0  # an image whose lowest value is below this holds HU values: a CT


def demo_cases(studies: Path) -> list[str]:
    """The studies of the folder (``<case>.nii.gz``), prepared by ``scripts/prepare_demo.py`` when there are none."""
    if not sorted(studies.glob("*.nii.gz")):
        from prepare_demo import main as prepare

        prepare(["--output", str(studies)])
    return sorted(p.name.removesuffix(".nii.gz") for p in studies.glob("*.nii.gz"))


def write_demo_series(studies: Path, out: Path) -> list[Path]:
    """Every study of ``studies`` as a DICOM series in ``out/<case>`` (written once; fixed UIDs)."""
    files: list[Path] = []
    for case in demo_cases(studies):
        folder = out / case
        if not (folder.is_dir() and any(folder.glob("*.dcm"))):
            image = sitk.ReadImage(str(studies / f"{case}.nii.gz"))
            modality = "CT" if float(sitk.GetArrayViewFromImage(image).min()) < AIR_HU else "MR"
            patient = PATIENTS.get(case, f"MEDSAM2-DEMO-{case.upper()}")
            seed = f"medsam2-demo-{case}"
            write_ct_series(image, folder, patient_id=patient, uid_seed=seed, description=case, modality=modality)
        files += sorted(folder.glob("*.dcm"))
    return files


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here (None: installed)."""
    missing = [p for p in (ORTHANC, DICOMWEB_PLUGIN) if not os.path.exists(p)]
    return f"{', '.join(missing)} missing" if missing else None


def port_in_use(port: int) -> bool:
    """Something already listens on 127.0.0.1:``port`` (e.g. Debian's own Orthanc service on 8042)."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=Path, default=REPO / "demo" / "studies", help="NIfTI studies to convert")
    ap.add_argument("--folder", type=Path, default=REPO / "demo" / "pacs", help="DICOM files, Orthanc, cache")
    ap.add_argument("--orthanc-port", type=int, default=8042)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--host", default="127.0.0.1")
    args, server_args = ap.parse_known_args(argv)
    if why := orthanc_missing():
        raise SystemExit(f"{why}: install Orthanc first (sudo bash scripts/install_pacs_tools.sh --pacs-only)")
    if port_in_use(args.orthanc_port):
        raise SystemExit(
            f"port {args.orthanc_port} is in use (Debian's Orthanc service? sudo systemctl stop orthanc), so the "
            "demo's Orthanc cannot start there: set MEDSAM2_ORTHANC_PORT (start_demo.sh) or --orthanc-port."
        )
    files = write_demo_series(args.studies, args.folder / "series")
    orthanc = LocalOrthanc(args.folder / "orthanc", args.orthanc_port, name="MEDSAM2-DEMO-PACS").start()
    try:
        known = requests.get(f"{orthanc.url}/instances", timeout=30).json()
        if len(known) < len(files):
            orthanc.upload(files)
        print(f"Orthanc (DICOMweb): {orthanc.dicomweb} with {len(files)} instances", flush=True)
        if not any(a == "checkpoint" for a in server_args):
            server_args += ["--conf", "checkpoint", os.environ.get("MEDSAM2_CHECKPOINT", "MedSAM2_latest")]
        env = {**os.environ, "MONAI_LABEL_DATASTORE_CACHE_PATH": str(args.folder / "cache")}
        # MONAI Label lists CT series only by default; the demo has MR studies too (Orthanc: a list matches any)
        env.setdefault("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", json.dumps({"Modality": "CT,MR"}))
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
