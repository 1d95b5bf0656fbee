#!/usr/bin/env bash
# Install (once) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check apps tests scripts bench
exec .venv/bin/python -m pytest -q tests "$@"
