#!/usr/bin/env bash
# Builds a Prometheus image with no registry: FROM scratch holding Debian's prometheus
# binary (`apt-get install prometheus`), its libraries and deploy/prometheus/prometheus.yml.
# With registry access, the upstream image works the same (see docker-compose.yml).
#
#   deploy/prometheus/build-image.sh [tag]      # default fleetmq-prometheus:local
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-fleetmq-prometheus:local}
BIN=${PROMETHEUS_BIN:-$(command -v prometheus || true)}
[[ -n "$BIN" ]] || { echo "no prometheus binary: apt-get install prometheus" >&2; exit 1; }
CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/rootfs/etc/prometheus" "$CTX/rootfs/bin" "$CTX/data"
cp -L "$BIN" "$CTX/rootfs/bin/prometheus"
for lib in $(ldd "$BIN" 2>/dev/null | grep -o '/[^ ]*' || true); do
    mkdir -p "$CTX/rootfs$(dirname "$lib")"
    cp -L "$lib" "$CTX/rootfs$lib"
done
cp deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml "$CTX/rootfs/etc/prometheus/"
echo 'nobody:x:65534:65534:nobody:/prometheus:/bin/prometheus' >"$CTX/rootfs/etc/passwd"
cat >"$CTX/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=65534:65534 data/ /prometheus/
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=0.0.0.0:9090"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q -t "$TAG" "$CTX" >&2
echo "$TAG"
