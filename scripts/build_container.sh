#!/usr/bin/env bash
# Build the MedSAM2 server's container image with podman (Debian: apt-get install podman debootstrap), from
# Debian's archive and PyPI only: a bookworm base made with debootstrap (once), then deploy/container/Containerfile.
#   bash scripts/build_container.sh                 # builds localhost/medsam2:latest
#   bash scripts/build_container.sh --smoke-test    # and starts it on the demo studies (random weights): /info/
# Environment: MEDSAM2_IMAGE (localhost/medsam2:latest), MEDSAM2_PODMAN_RUN_FLAGS (flags for every container
# podman starts, e.g. a runtime and ulimits for a host that refuses the defaults; see docs/operations.md#container),
# MEDSAM2_BUILD_CA_BUNDLE (a CA bundle the build's downloads must trust: a TLS-inspecting proxy's), PIP_FIND_LINKS.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
image="${MEDSAM2_IMAGE:-localhost/medsam2:latest}"
base="localhost/medsam2-debian-base:bookworm"
read -r -a run_flags <<< "${MEDSAM2_PODMAN_RUN_FLAGS:-}"
for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "build_container: $tool not installed (apt-get install podman debootstrap)" >&2; exit 1; }
done
if ! podman image exists "$base"; then
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,python3.11,ca-certificates bookworm "$rootfs" \
    http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | podman import - "$base" >/dev/null
  echo "build_container: base image $base from Debian bookworm"
fi
if [ -z "${MEDSAM2_PODMAN_RUN_FLAGS+set}" ] && ! podman run --rm --network host "$base" true >/dev/null 2>&1; then
  # e.g. a VM without CAP_SYS_RESOURCE: the OCI runtime cannot raise the container's open-file limit
  fallback=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
  if command -v runc >/dev/null; then fallback=(--runtime "$(command -v runc)" "${fallback[@]}"); fi
  podman run --rm --network host "${fallback[@]}" "$base" true ||
    { echo "build_container: podman cannot start a container on this host (see the error above)" >&2; exit 1; }
  run_flags=("${fallback[@]}")
  echo "build_container: this host refuses podman's default container limits; using: ${run_flags[*]}"
fi
# Disk: measured, the build took up to 17 GB at once (torch's layer committed: the build container's files and
# the new layer in podman's storage, 6 GB of compressed archives in $TMPDIR); 11 GB once torch's stage is built.
# Not enough fails within minutes with a bare "no space left on device": say so first.
store="$(podman info --format '{{.Store.GraphRoot}}')"
tmp="${TMPDIR:-/var/tmp}"
# GB at once on one disk; in podman's storage; in $TMPDIR
if podman image exists "$image-torch"; then gb=(11 9 3); else gb=(18 14 7); fi
if [ "$(stat -c %d "$store")" = "$(stat -c %d "$tmp")" ]; then checks=("$store ${gb[0]}"); else
  checks=("$store ${gb[1]}" "$tmp ${gb[2]}"); fi
for check in "${checks[@]}"; do
  read -r dir need <<< "$check"
  have="$(df -BG --output=avail "$dir" | tail -1 | tr -dc 0-9)"
  echo "build_container: $have GB free on $dir; the build needs about $need GB there"
  [ "$have" -ge "$need" ] || {
    echo "build_container: not enough disk on $dir: free some (podman system prune -a removes unused images)" \
      "or set TMPDIR to a larger disk" >&2
    exit 1
  }
done
# compressed layer archives: the temporary copies take ~0.6 of a layer, not all of it
build=(podman build -f deploy/container/Containerfile --network host --disable-compression=false)
if [ -n "${MEDSAM2_BUILD_CA_BUNDLE:-}" ]; then  # a TLS-inspecting proxy's CA: the downloads trust it too
  build+=(--volume "$MEDSAM2_BUILD_CA_BUNDLE:/etc/ssl/build-ca.crt:ro" --build-arg SSL_CERT_FILE=/etc/ssl/build-ca.crt)
fi
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
  build+=(--volume "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro" --build-arg "PIP_FIND_LINKS=$PIP_FIND_LINKS")
fi
# torch's stage first, committed on its own: it bounds the disk the build takes (see the Containerfile); the
# second run takes that stage from the layer cache
"${build[@]}" "${run_flags[@]}" --target torch -t "$image-torch" .
"${build[@]}" "${run_flags[@]}" -t "$image" .
echo "build_container: built $image ($(podman image inspect "$image" --format '{{.Size}}') bytes)"
[ "${1:-}" = "--smoke-test" ] || exit 0

# the smoke test: the image on the demo studies with random weights answers /info/ and a 2D box
.venv/bin/python scripts/prepare_demo.py --output demo/studies >/dev/null
studies="$(mktemp -d)"  # a copy: the server writes its datastore's index and the labels there
cp -r demo/studies/. "$studies/"
port="${MEDSAM2_SMOKE_PORT:-18000}"
name="medsam2-smoke-$$"
podman run -d --name "$name" --network host "${run_flags[@]}" -v "$studies:/data/studies" \
  "$image" --port "$port" --studies /data/studies --conf checkpoint random --conf warm_up off >/dev/null
trap 'podman rm -f -t 10 "$name" >/dev/null 2>&1 || true; rm -rf "$studies"' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/info/" >/dev/null && break
  [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] || break
  sleep 2
done
curl -sf "http://127.0.0.1:$port/info/" | grep -q medsam2_3d || { podman logs "$name" | tail -20; exit 1; }
box='{"label": "lesion", "roi": [385, 317, 395, 335, 20, 20], "slice": 20}'  # the README's 2D request
answer="$(mktemp)"
curl -sf -X POST "http://127.0.0.1:$port/infer/medsam2_2d?image=lung2&output=image" -F "params=$box" -o "$answer" &&
  [ -s "$answer" ] || { podman logs "$name" | tail -20; exit 1; }
echo "build_container: smoke test passed ($image: /info/ and a 2D box on lung2)"
