#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned stack. Re-running skips what is already done.
#   bash scripts/setup.sh           # everything: the Python stack and OHIF's release with the panel
#   bash scripts/setup.sh torch     # only torch and torchvision (the container build's first layer)
#   bash scripts/setup.sh python    # the Python stack without OHIF
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
part="${1:-all}"
case "$part" in all | torch | python) ;; *) echo "setup: unknown part '$part' (all, torch, python)" >&2; exit 2 ;; esac
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.medsam2-installed
want="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
# torch and torchvision as requirements.txt pins them, installed before sam2 builds against them
mapfile -t torch_pins < <(grep -E '^(torch|torchvision)==' requirements.txt)
if [ "$part" = torch ]; then
  "${pip[@]}" install "${torch_pins[@]}"
  echo "setup: ${torch_pins[*]} installed into $root/.venv"
  exit 0
fi
# OHIF's release with the MedSAM2 panel, served at /ohif/ (from the npm registry, pinned; no Node.js needed)
if [ "$part" = all ]; then
  .venv/bin/python scripts/install_ohif.py ||
    echo "setup: OHIF not installed: /ohif/ will serve MONAI Label's bundled viewer (no MedSAM2 panel)" >&2
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
"${pip[@]}" install "setuptools<81" wheel
"${pip[@]}" install "${torch_pins[@]}"
# sam2 1.1.0 is an sdist: build against the torch above, without its CUDA extension.
SAM2_BUILD_CUDA=0 "${pip[@]}" install --no-build-isolation sam2==1.1.0
"${pip[@]}" install -r requirements.txt -r requirements-dev.txt
echo "$want" > "$stamp"
echo "setup: installed into $root/.venv"
