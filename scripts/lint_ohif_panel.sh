#!/usr/bin/env bash
# Lint the OHIF panel's JavaScript (apps/medsam2/ohif/panel/src) with the eslint pinned in its package-lock.json
# (flat config: apps/medsam2/ohif/panel/eslint.config.js). Installs the pinned packages when the lock changed.
# Without Node.js it says so and exits 0, unless MEDSAM2_REQUIRE_PACS=1 (CI installs Node.js: .ci/run).
set -euo pipefail
cd "$(dirname "$0")/../apps/medsam2/ohif/panel"
if ! command -v npm >/dev/null; then
  echo "lint_ohif_panel: Node.js/npm is not installed (scripts/install_pacs_tools.sh installs it)" >&2
  [[ "${MEDSAM2_REQUIRE_PACS:-}" == "1" ]] && exit 1
  exit 0
fi
stamp=node_modules/.medsam2-package-lock.json
if ! cmp -s package-lock.json "$stamp"; then
  npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json "$stamp"
fi
npm run --silent lint
