#!/usr/bin/env bash
# `make test-containers`: the real stack in containers, on this machine.
#   1. Debian packages: dockerd + runc, debootstrap, PostgreSQL, Fashion-MNIST, iproute2 (ip netns)
#   2. a private dockerd (containers/dockerd.sh; stopped at the end, its data root kept as
#      the layer cache: $TLPIPE_DOCKER_DIR, default /var/lib/tlpipe-docker)
#   3. the base image (official, or debootstrap), the tlpipe and mlflow-server images
#   4. pytest -m containers (tests/test_containers.py) in a network namespace of its own, with
#      the dockerd restarted inside it: a TrainJob's nodes sit on a bridge network that the
#      Kubeflow SDK creates, and reach S3 and MLflow at $TLPIPE_TEST_HOST, an address on the
#      namespace's loopback. Every packet of the tests stays in that namespace; the builds
#      (which need the package index) run before, outside it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=""
  for pkg in docker.io runc debootstrap postgresql dataset-fashion-mnist iproute2; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
  done
  if [ -n "$need" ]; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need >/dev/null
  fi
fi
# The [containers] extra only when something is missing: never reinstall (a shared venv's
# editable install may point at another checkout; this one's sources come first on PYTHONPATH).
if ! "$BIN/python" -c "import tlpipe, docker, boto3, moto, kfp, kubeflow.trainer" 2>/dev/null; then
  "$BIN/python" -m pip install -q -e '.[containers]' 2>&1 | grep -v "is ignored" || true
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

: "${TLPIPE_DOCKER_DIR:=/var/lib/tlpipe-docker}"
export TLPIPE_DOCKER_DIR TLPIPE_DOCKER_SOCK="$TLPIPE_DOCKER_DIR/docker.sock"
export DOCKER_HOST="unix://$TLPIPE_DOCKER_SOCK"
containers/dockerd.sh start
trap 'containers/dockerd.sh stop' EXIT

start=$SECONDS
nice -n 10 containers/build.sh
echo "test-containers: images built in $((SECONDS - start)) s;" \
  "engine data $(du -sh "$TLPIPE_DOCKER_DIR/root" 2>/dev/null | cut -f1)"

containers/dockerd.sh stop
ns="tlpipe-test-$$"
: "${TLPIPE_TEST_HOST:=10.213.0.1}"
export TLPIPE_TEST_HOST
ip netns add "$ns"
trap 'containers/dockerd.sh stop; ip netns del "$ns" 2>/dev/null || true' EXIT
ip -n "$ns" link set lo up
ip -n "$ns" addr add "$TLPIPE_TEST_HOST/32" dev lo
in_ns() { nsenter --net="/var/run/netns/$ns" "$@"; }
in_ns containers/dockerd.sh start
in_ns env PATH="$PWD/$BIN:$PATH" "$BIN/pytest" -q -m containers tests/test_containers.py
