#!/usr/bin/env bash
# Builds the fleetmq image with no registry: FROM scratch holding the release binary (debug
# info stripped), the shared libraries it links (taken from this machine), a non-root user
# (10001) and a health check (`fleetmq --probe`). This is the path the tests use.
#
#   deploy/docker/build-image.sh                 # cargo build --release, tag fleetmq:local
#   FLEETMQ_BIN=target/debug/fleetmq deploy/docker/build-image.sh fleetmq:test
#
# With registry access, deploy/docker/Dockerfile builds the same image from source instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-fleetmq:local}
BIN=${FLEETMQ_BIN:-}
if [[ -z "$BIN" ]]; then
    cargo build --release -p fleetmq >&2
    BIN=target/release/fleetmq
fi
CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/rootfs/etc" "$CTX/data"
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug -o "$CTX/rootfs/fleetmq" "$BIN"
else
    cp "$BIN" "$CTX/rootfs/fleetmq"
fi
for lib in $(ldd "$BIN" | grep -o '/[^ ]*'); do
    mkdir -p "$CTX/rootfs$(dirname "$lib")"
    cp -L "$lib" "$CTX/rootfs$lib"
done
echo 'fleetmq:x:10001:10001:fleetmq:/data:/fleetmq' >"$CTX/rootfs/etc/passwd"
echo 'fleetmq:x:10001:' >"$CTX/rootfs/etc/group"
cp deploy/docker/Dockerfile.scratch "$CTX/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$TAG" "$CTX" >&2
echo "$TAG"
