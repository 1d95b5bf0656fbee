#!/usr/bin/env bash
# System packages for the PACS, viewer and scale-out tests (Debian/Ubuntu): Orthanc with its DICOMweb plugin (and
# its Python plugin, for the PACS that takes only a bearer token),
# Chromium with ChromeDriver for the OHIF browser tests, nginx for the replicas test, nginx and openssl for the
# production install's test (a self-signed certificate), podman, runc and debootstrap for the container image
# (scripts/build_container.sh), and Node.js/npm (unless one
# is installed) for the test that rebuilds the OHIF panel from its pinned packages. Idempotent; needs root
# (or sudo). The tests start their own Orthanc and nginx on 127.0.0.1 with temporary storage: the Debian
# services are not used (and not started here).
#   --pacs-only   Orthanc and its DICOMweb plugin only (what scripts/start_demo.sh needs)
# Exits 1 with one line on stderr when it cannot install (not root and no password-less sudo, or apt-get failed).
set -euo pipefail
if [ "${1-}" = "--pacs-only" ]; then
  packages=(orthanc orthanc-dicomweb)
else
  packages=(orthanc orthanc-dicomweb orthanc-python chromium chromium-driver nginx openssl podman runc debootstrap)
  command -v npm >/dev/null || packages+=(nodejs npm)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_pacs_tools: ${packages[*]} already installed"
  exit 0
fi
run=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null || ! sudo -n true 2>/dev/null; then
    echo "install_pacs_tools: ${missing[*]} not installed: needs root (or password-less sudo)" >&2
    exit 1
  fi
  run=(sudo -n)
fi
if ! command -v apt-get >/dev/null; then
  echo "install_pacs_tools: ${missing[*]} not installed: no apt-get (Debian/Ubuntu packages)" >&2
  exit 1
fi
# policy-rc.d 101: the packages install without starting the system Orthanc or nginx service
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | "${run[@]}" tee /usr/sbin/policy-rc.d >/dev/null
  "${run[@]}" chmod +x /usr/sbin/policy-rc.d
  trap '"${run[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
fi
log="$(mktemp)"
if ! { "${run[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -qq "${missing[@]}"; } \
  >"$log" 2>&1; then
  echo "install_pacs_tools: apt-get could not install ${missing[*]}: $(grep -m1 -E '^(E|W):' "$log" || tail -n1 "$log")" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
echo "install_pacs_tools: installed ${missing[*]}"
