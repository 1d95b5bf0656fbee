#!/usr/bin/env bash
# The README's first command. Install (once), prepare the demo studies (real CT/MR cases with manual labels), put
# them as DICOM series into a local Orthanc (a PACS with DICOMweb, installed here once with apt-get) and start the
# server on it, on http://127.0.0.1:8000: OHIF (/ohif/) lists the demo studies, Slicer opens them as before.
# Orthanc stops with the server. Where Orthanc cannot be installed (no root or sudo, no apt-get), the server reads
# the demo studies folder instead, said in one line: Slicer and curl work the same, OHIF lists no studies.
# Extra arguments go to `monailabel start_server`, e.g.
#   bash scripts/start_demo.sh --conf checkpoint random      # offline: random weights, for development
# Environment: MEDSAM2_HOST, MEDSAM2_PORT (8000), MEDSAM2_ORTHANC_PORT (8042), MEDSAM2_DEMO_DIR (demo),
# MEDSAM2_DEMO_DATASTORE=local (the studies folder, no Orthanc), MEDSAM2_CHECKPOINT (MedSAM2_latest).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
demo="${MEDSAM2_DEMO_DIR:-demo}"
host="${MEDSAM2_HOST:-127.0.0.1}"
port="${MEDSAM2_PORT:-8000}"
bash scripts/setup.sh
.venv/bin/python scripts/prepare_demo.py --output "$demo/studies"
args=("$@")
case " ${args[*]-} " in
  *" checkpoint "*) ;;
  *) args+=(--conf checkpoint "${MEDSAM2_CHECKPOINT:-MedSAM2_latest}") ;;
esac
export PATH="$root/.venv/bin:$PATH"
if [ "${MEDSAM2_DEMO_DATASTORE:-pacs}" != local ]; then
  if why="$(bash scripts/install_pacs_tools.sh --pacs-only 2>&1 >/dev/null)"; then
    exec .venv/bin/python scripts/pacs_demo.py --studies "$demo/studies" --folder "$demo/pacs" \
      --orthanc-port "${MEDSAM2_ORTHANC_PORT:-8042}" --host "$host" --port "$port" "${args[@]}"
  fi
  echo "start_demo: no local PACS (${why#install_pacs_tools: }); serving the folder $demo/studies instead:" \
    "Slicer and curl work, OHIF lists no studies (as root: bash scripts/install_pacs_tools.sh --pacs-only)" >&2
fi
exec monailabel start_server --app apps/medsam2 --studies "$demo/studies" --host "$host" --port "$port" "${args[@]}"
