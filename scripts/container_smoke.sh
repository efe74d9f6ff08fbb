#!/usr/bin/env bash
# Container smoke test, on demand (not part of `make test`): build the real OCI image of the
# service with the chosen models, start it, wait for /readyz, generate an image, check it
# runs as non-root, stop it cleanly and remove the container. Prints image size, build time,
# time to ready and the request's latency.
#
#   scripts/container_smoke.sh                  # tiny-sdxl
#   SDXL_MODELS=sdxl-turbo scripts/container_smoke.sh
#
# Where a Docker daemon runs, the image is built with it; elsewhere with buildah (vfs storage,
# chroot isolation), and when Docker Hub is out of reach the base image python:3.11-slim is
# made locally with debootstrap (Debian's own tool, from Debian's package mirror, the only
# registry such a machine reaches).
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${SDXL_MODELS:-tiny-sdxl}
PORT=${SMOKE_PORT:-3917}
WORK=${SMOKE_WORK:-$PWD/build/container}
IMAGE=${SMOKE_IMAGE:-localhost/sdxl-smoke:latest}
BASE=docker.io/library/python:3.11-slim
export BENTOML_DO_NOT_TRACK=true SDXL_MODELS="$MODELS"

say() { printf '\n== %s\n' "$*"; }
seconds_since() { echo "$(( $(date +%s) - $1 ))"; }

make -s install
PY=.venv/bin/python
for model in ${MODELS//,/ }; do $PY -m models import "$model"; done

if docker info >/dev/null 2>&1; then
  BACKEND=docker
else
  BACKEND=buildah
  command -v buildah >/dev/null && command -v debootstrap >/dev/null || {
    say "installing buildah and debootstrap"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah debootstrap
  }
  mkdir -p "$WORK/storage" "$WORK/run" "$WORK/tmp"
  cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
  export CONTAINERS_STORAGE_CONF="$WORK/storage.conf" STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot TMPDIR="$WORK/tmp"
fi

make_local_base_image() {
  # python:3.11-slim stand-in: Debian bookworm (Python 3.11) from the Debian mirror apt uses.
  local rootfs="$WORK/rootfs" mirror
  mirror=$(grep -rhoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 || true)
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log"
  # Trust the CAs this host trusts (an intercepting proxy's), or RUN steps cannot reach PyPI.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    TMPDIR=/tmp chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  local ctr mnt
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  cp -a "$rootfs/." "$mnt/"
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --env PIP_BREAK_SYSTEM_PACKAGES=1 --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --env REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    --env UV_NATIVE_TLS=1 --cmd python3 "$ctr"
  buildah commit -q "$ctr" "$BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
  rm -rf "$rootfs"
}

if [ "$BACKEND" = buildah ] && ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  if ! timeout 60 buildah pull -q "$BASE" >/dev/null 2>&1; then
    say "Docker Hub is out of reach: making $BASE locally with debootstrap"
    started=$(date +%s)
    make_local_base_image
    echo "base image made in $(seconds_since "$started") s"
  fi
fi

say "building the bento and the image ($BACKEND, models: $MODELS)"
started=$(date +%s)
TAG=$(.venv/bin/bentoml build --output tag | tail -1 | sed 's/^__tag__://')
.venv/bin/bentoml containerize --backend "$BACKEND" -t "$IMAGE" "$TAG"
BUILD_S=$(seconds_since "$started")

if [ "$BACKEND" = buildah ]; then
  SIZE=$(buildah images --format '{{.Size}}' "$IMAGE" | head -1)
else
  SIZE=$(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')
fi

say "starting the image"
RUN_DIR=$(mktemp -d)
chmod 1777 "$RUN_DIR"  # the server runs as uid 1034 and writes its pid and uid here
SERVE="echo \$\$ > /smoke/pid; id -u > /smoke/uid; exec /home/bentoml/bento/env/docker/entrypoint.sh serve --host 127.0.0.1 --port $PORT"
CTR=""
RUNNER=""
stop_server() {
  # SIGTERM to the server itself: with buildah, signalling `buildah run` would orphan the worker.
  if [ "$BACKEND" = docker ]; then
    docker stop -t 30 "$CTR" >/dev/null
  elif [ -s "$RUN_DIR/pid" ]; then
    kill -TERM "$(cat "$RUN_DIR/pid")" 2>/dev/null || true
    wait "$RUNNER" 2>/dev/null || true
  fi
}
cleanup() {
  if [ -n "$CTR" ]; then
    stop_server || true
    if [ "$BACKEND" = buildah ]; then buildah rm "$CTR" >/dev/null 2>&1 || true; else docker rm -f "$CTR" >/dev/null 2>&1 || true; fi
  fi
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT
started=$(date +%s.%N)
if [ "$BACKEND" = buildah ]; then
  CTR=$(buildah from "$IMAGE")
  # Chroot isolation shares the host's network; `buildah run` ignores ENTRYPOINT, so call it.
  buildah run --isolation chroot -v "$RUN_DIR:/smoke" "$CTR" -- sh -c "$SERVE" >"$WORK/server.log" 2>&1 &
  RUNNER=$!
else
  CTR=sdxl-smoke-$$
  docker run -d --name "$CTR" --network host -v "$RUN_DIR:/smoke" --entrypoint sh "$IMAGE" -c "$SERVE" >/dev/null
fi

for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null || { tail -50 "$WORK/server.log" 2>/dev/null; echo "FAIL: not ready"; exit 1; }
READY_S=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')")

say "generating"
req_started=$(date +%s.%N)
curl -sf "http://127.0.0.1:$PORT/v1/txt2img" -H 'Content-Type: application/json' -H 'Accept: image/png' \
  -d '{"prompt": "a lighthouse at dusk", "width": 512, "height": 384, "steps": 4, "seed": 1}' -o "$RUN_DIR/out.png"
LATENCY_S=$(python3 -c "import time; print(f'{time.time() - $req_started:.2f}')")
$PY - "$RUN_DIR/out.png" <<'EOF'
import sys
from PIL import Image
image = Image.open(sys.argv[1])
assert image.format == "PNG" and image.size == (512, 384), (image.format, image.size)
print(f"got a {image.width}x{image.height} PNG")
EOF

UID_IN=$(cat "$RUN_DIR/uid")
[ "$UID_IN" != 0 ] || { echo "FAIL: the server runs as root"; exit 1; }

say "stopping"
stop_server
if curl -sf "http://127.0.0.1:$PORT/livez" >/dev/null 2>&1; then echo "FAIL: still serving after SIGTERM"; exit 1; fi
if [ "$BACKEND" = buildah ]; then buildah rm "$CTR" >/dev/null; else docker rm "$CTR" >/dev/null; fi
CTR=""

cat <<EOF

container smoke test passed
  backend        $BACKEND
  models         $MODELS
  image          $IMAGE ($SIZE)
  build time     ${BUILD_S} s (bento + image)
  time to ready  ${READY_S} s
  request        ${LATENCY_S} s (512x384, 4 steps)
  server uid     $UID_IN (non-root)
EOF
