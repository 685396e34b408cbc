#!/usr/bin/env bash
# Build tlpipe's two images against the dockerd at $DOCKER_HOST:
#   $TLPIPE_IMAGE        (default tlpipe:0.1.0-cpu)    the pipeline-step image (runtime target)
#   $TLPIPE_MLFLOW_IMAGE (default tlpipe-mlflow:0.1.0) the tracking server (mlflow-server target)
# The base is the official Python image, or one made with debootstrap (containers/base.sh).
# This machine's pip configuration goes in as build secrets (local folders served on
# 127.0.0.1 for the build's duration); nothing of it is baked into a layer.
set -euo pipefail
cd "$(dirname "$0")/.."
docker=/usr/bin/docker
: "${TLPIPE_IMAGE:=tlpipe:0.1.0-cpu}"
: "${TLPIPE_MLFLOW_IMAGE:=tlpipe-mlflow:0.1.0}"
: "${TLPIPE_PIP_PORT:=38765}"
export DOCKER_BUILDKIT=1

base="$(containers/base.sh)"
work="$(mktemp -d)"
python3 containers/pip_for_build.py "$work/serve" "$TLPIPE_PIP_PORT" >"$work/pip.conf"
python3 -m http.server -b 127.0.0.1 -d "$work/serve" "$TLPIPE_PIP_PORT" >"$work/http.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
ca=/etc/ssl/certs/ca-certificates.crt

# CPU torch comes from the PyTorch CPU index where it is reachable; elsewhere torch comes from
# the configured index (here: the CUDA build, which makes the image ~7 GB instead of ~2 GB).
cpu_index="${TLPIPE_TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}"
if [ -n "$cpu_index" ] && ! timeout 15 python3 -c "import sys, urllib.request as u; \
u.urlopen(sys.argv[1] + '/', timeout=10)" "$cpu_index" >/dev/null 2>&1; then
  echo "build: $cpu_index not reachable: torch from the configured index" >&2
  cpu_index=""
fi

build() {
  "$docker" build --network host --build-arg BASE_IMAGE="$base" \
    --build-arg TORCH_CPU_INDEX="$cpu_index" \
    --build-arg GIT_SHA="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --secret id=pip.conf,src="$work/pip.conf" --secret id=ca.crt,src="$ca" "$@" .
}
start=$SECONDS
build -t "$TLPIPE_IMAGE"
echo "build: $TLPIPE_IMAGE in $((SECONDS - start)) s" >&2
start=$SECONDS
build --target mlflow-server -t "$TLPIPE_MLFLOW_IMAGE"
echo "build: $TLPIPE_MLFLOW_IMAGE in $((SECONDS - start)) s" >&2
# Each source change leaves the previous ~7 GB image dangling, and its ~7 GB venv layer in
# the build cache: drop those, and cap the cache (least recently used first).
"$docker" image prune -f >/dev/null
"$docker" builder prune -f --keep-storage "${TLPIPE_BUILD_CACHE_KEEP:-24GB}" >/dev/null
"$docker" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E "^(${TLPIPE_IMAGE%%:*}|${TLPIPE_MLFLOW_IMAGE%%:*}|tlpipe-base):" >&2 || true
