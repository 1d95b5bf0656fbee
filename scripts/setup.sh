#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned stack. Re-running skips what is already done.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.medsam2-installed
want="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
# OHIF's release with the MedSAM2 panel, served at /ohif/ (from the npm registry, pinned; no Node.js needed)
.venv/bin/python scripts/install_ohif.py ||
  echo "setup: OHIF not installed: /ohif/ will serve MONAI Label's bundled viewer (no MedSAM2 panel)" >&2
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
"${pip[@]}" install "setuptools<81" wheel
"${pip[@]}" install torch==2.14.1 torchvision==0.29.1
# sam2 1.1.0 is an sdist: build against the torch above, without its CUDA extension.
SAM2_BUILD_CUDA=0 "${pip[@]}" install --no-build-isolation sam2==1.1.0
"${pip[@]}" install -r requirements.txt -r requirements-dev.txt
echo "$want" > "$stamp"
echo "setup: installed into $root/.venv"
