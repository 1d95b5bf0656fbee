#!/usr/bin/env bash
# System packages for the PACS, viewer and scale-out tests (Debian/Ubuntu): Orthanc with its DICOMweb plugin,
# Chromium with ChromeDriver for the OHIF browser tests, nginx for the replicas test, nginx and openssl for the
# production install's test (a self-signed certificate), and Node.js/npm (unless one
# is installed) for the test that rebuilds the OHIF panel from its pinned packages. Idempotent; needs root
# (or sudo). The tests start their own Orthanc and nginx on 127.0.0.1 with temporary storage: the Debian
# services are not used (and not started here).
set -euo pipefail
packages=(orthanc orthanc-dicomweb chromium chromium-driver nginx openssl)
command -v npm >/dev/null || packages+=(nodejs npm)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_pacs_tools: ${packages[*]} already installed"
  exit 0
fi
run=()
[ "$(id -u)" -eq 0 ] || run=(sudo)
# policy-rc.d 101: the packages install without starting the system Orthanc or nginx service
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | "${run[@]}" tee /usr/sbin/policy-rc.d >/dev/null
  "${run[@]}" chmod +x /usr/sbin/policy-rc.d
  trap '"${run[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
fi
"${run[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
echo "install_pacs_tools: installed ${missing[*]}"
