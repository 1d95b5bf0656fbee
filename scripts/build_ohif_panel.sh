#!/usr/bin/env bash
# Rebuild the MedSAM2 OHIF panel (apps/medsam2/ohif/dist/medsam2-ohif.js) from its sources, with the exact npm
# packages pinned in apps/medsam2/ohif/panel/package-lock.json (React 18.3.1, esbuild 0.28.2). Needs Node.js
# and the npm registry; the built file is committed, so running the app does not.
set -euo pipefail
cd "$(dirname "$0")/../apps/medsam2/ohif/panel"
npm ci --no-audit --no-fund
npm run build
