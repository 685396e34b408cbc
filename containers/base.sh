#!/usr/bin/env bash
# Print the base image for tlpipe's Dockerfile (its BASE_IMAGE build arg), building it first
# when needed: the official Python image when a registry serves it, else a Debian bookworm
# image made here with debootstrap from the Debian mirror (no registry needed).
#
#   BASE_IMAGE="$(containers/base.sh)"     # needs DOCKER_HOST pointing at a running dockerd
set -euo pipefail
docker=/usr/bin/docker
official="${TLPIPE_OFFICIAL_BASE:-python:3.11.13-slim-bookworm}"
local_base="tlpipe-base:bookworm-py311"

if "$docker" image inspect "$official" >/dev/null 2>&1 \
   || timeout 60 "$docker" pull -q "$official" >/dev/null 2>&1; then
  echo "$official"; exit 0
fi
if "$docker" image inspect "$local_base" >/dev/null 2>&1; then
  echo "$local_base"; exit 0
fi

echo "base: $official not reachable; building $local_base with debootstrap" >&2
mirror="$(sed -n 's/^URIs: *//p; s/^deb \(\[[^]]*\] \)\?\(http[^ ]*\) .*/\2/p' \
  /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
  | grep -v security | head -1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
tar -C "$work/rootfs" -c . | "$docker" import - tlpipe-base:bookworm-minbase >/dev/null

# The same layout as the official image where the Dockerfile relies on it: `python` on PATH,
# venv support, CA certificates.
cat >"$work/Dockerfile" <<'DOCKERFILE'
FROM tlpipe-base:bookworm-minbase
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
         python3.11 python3.11-venv ca-certificates \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
ENV LANG=C.UTF-8
CMD ["python3"]
DOCKERFILE
DOCKER_BUILDKIT=1 "$docker" build --network host -q -t "$local_base" "$work" >/dev/null
echo "$local_base"
