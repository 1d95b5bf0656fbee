#!/usr/bin/env bash
# Install (once), prepare the demo studies (real CT/MR cases with manual labels) and start the server
# on http://127.0.0.1:8000. Extra arguments go to `monailabel start_server`, e.g.
#   bash scripts/start_demo.sh --conf checkpoint random      # offline: random weights, for development
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python scripts/prepare_demo.py --output demo/studies
args=("$@")
case " ${args[*]-} " in
  *" checkpoint "*) ;;
  *) args+=(--conf checkpoint "${MEDSAM2_CHECKPOINT:-MedSAM2_latest}") ;;
esac
export PATH="$root/.venv/bin:$PATH"
exec monailabel start_server --app apps/medsam2 --studies demo/studies \
  --host "${MEDSAM2_HOST:-127.0.0.1}" --port "${MEDSAM2_PORT:-8000}" "${args[@]}"
