#!/usr/bin/env bash
# Start or stop a private dockerd for tlpipe's container tests.
#
#   containers/dockerd.sh start   # prints nothing; the socket is $TLPIPE_DOCKER_SOCK
#   containers/dockerd.sh stop
#
# Private socket and data root (the data root persists between runs: it is the layer cache).
# Host networking only, no iptables/bridge: these machines have neither, and the tests reach
# their services on 127.0.0.1. The ulimits are the largest the machine lets a container have.
set -euo pipefail
: "${TLPIPE_DOCKER_DIR:=/var/lib/tlpipe-docker}"
: "${TLPIPE_DOCKER_SOCK:=$TLPIPE_DOCKER_DIR/docker.sock}"
pidfile="$TLPIPE_DOCKER_DIR/dockerd.pid"
docker_cli=/usr/bin/docker   # Debian's client matches dockerd 20.10 (a newer one wants buildx)

case "${1:-}" in
  start)
    mkdir -p "$TLPIPE_DOCKER_DIR/root" "$TLPIPE_DOCKER_DIR/exec"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "dockerd already running (pid $(cat "$pidfile"))"; exit 0
    fi
    dockerd --data-root "$TLPIPE_DOCKER_DIR/root" --exec-root "$TLPIPE_DOCKER_DIR/exec" \
      --pidfile "$pidfile" -H "unix://$TLPIPE_DOCKER_SOCK" --storage-driver overlay2 \
      --iptables=false --ip6tables=false --bridge=none \
      --default-ulimit nofile=20000:20000 --default-ulimit nproc=32768:32768 \
      >"$TLPIPE_DOCKER_DIR/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
      DOCKER_HOST="unix://$TLPIPE_DOCKER_SOCK" "$docker_cli" info >/dev/null 2>&1 && exit 0
      sleep 1
    done
    echo "dockerd did not start; see $TLPIPE_DOCKER_DIR/dockerd.log" >&2
    tail -20 "$TLPIPE_DOCKER_DIR/dockerd.log" >&2
    exit 1
    ;;
  stop)
    [ -f "$pidfile" ] || exit 0
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 1; done
    echo "dockerd (pid $pid) did not stop in 30 s" >&2
    exit 1
    ;;
  *)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
