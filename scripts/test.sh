#!/usr/bin/env bash
# Install (once) and run the whole test suite. `--fast`: only the quick unit tests (no real server, PACS, browser
# or slow test; see docs/testing.md). Other arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check apps tests scripts bench
bash scripts/lint_ohif_panel.sh  # eslint on the OHIF panel's sources
# idle OpenMP threads sleep instead of spinning: on a shared 2-core machine (pytest, servers and their training
# processes at once) the engine tests ran 2-6x faster
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [[ "${1:-}" == "--fast" ]]; then
  shift
  exec .venv/bin/python -m pytest -q -m "not server and not pacs and not browser and not slow" tests "$@"
fi
# the whole suite on two workers, a test file per worker at a time (its module fixtures are built once): on
# 2 cores the servers, Chromium and Orthanc of one file wait on I/O while the other file computes; the files in
# the order tests/conftest.py gives them (the longest first), not xdist's (the most tests first)
exec .venv/bin/python -m pytest -q -n "${MEDSAM2_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
  --durations 40 tests "$@"
