#!/usr/bin/env bash
# Build local stand-ins for the base images docker-compose.yml needs, for machines that cannot
# pull images (no registry), and print the variables that point the compose file at them.
#
#   eval "$(bash scripts/offline-images.sh)"      # build (or reuse) the stand-ins, export the variables
#   docker compose up -d --build --wait           # the same docker-compose.yml, run on the stand-ins
#
# What it builds (all from Debian bookworm packages; the recipes are deploy/offline/*.Dockerfile):
#   dagsmith-local/debian:bookworm     debootstrap --variant=minbase, imported with `docker import`
#   dagsmith-local/python:3.11         stands in for python:3.11-slim-bookworm   (PYTHON_IMAGE)
#   dagsmith-local/postgres:15         stands in for postgres:15-bookworm        (POSTGRES_IMAGE)
#   dagsmith-local/rabbitmq:3-management  stands in for rabbitmq:3-management    (RABBITMQ_IMAGE)
#   dagsmith-local/prometheus:2        stands in for prom/prometheus             (PROMETHEUS_IMAGE)
# and a wheelhouse (every Python dependency plus the CPU build of torch, as wheels built on this
# host) that the Dockerfile installs from with --no-index (DAGSMITH_PIP_ARGS), linked into
# ./wheelhouse/ so that it is part of the build context. Grafana has no Debian package: its
# official image stays (GRAFANA_IMAGE); the dashboards are checked through Prometheus instead.
#
# Everything is cached: the Debian base is rebuilt only when its recipe changes, the stand-ins
# are ordinary `docker build`s (layer cache), the wheelhouse lives in $DAGSMITH_CACHE (default
# /var/cache/dagsmith) and is refreshed only when pyproject.toml changes. A warm run takes seconds.
#
# Standard output carries only `export NAME=value` lines (for eval); progress goes to standard
# error. The same lines are written to $DAGSMITH_CACHE/images.env (for `docker compose --env-file`).
# Needs: root (debootstrap), a running Docker engine (scripts/docker-engine.sh), Debian's mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${DAGSMITH_CACHE:-/var/cache/dagsmith}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
BASE=dagsmith-local/debian:$SUITE

say() { echo "offline-images: $*" >&2; }
die() { say "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker is not installed (run scripts/docker-engine.sh)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (run scripts/docker-engine.sh)"
mkdir -p "$CACHE"

# --- 1. The Debian base, from debootstrap -------------------------------------------------------
# The recipe (this block) is hashed into a label; an image with the same label is reused.
base_recipe="suite=$SUITE variant=minbase include=ca-certificates policy-rc.d=101 apt=no-recommends,clean v1"
base_key="$(printf '%s' "$base_recipe" | sha256sum | cut -c1-16)"
have_key="$(docker image inspect --format '{{ index .Config.Labels "dagsmith.recipe" }}' "$BASE" 2>/dev/null || true)"
if [ "$have_key" != "$base_key" ]; then
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  say "debootstrap $SUITE into $rootfs (about a minute)"
  debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $CACHE/debootstrap.log"
  # What official Debian images do: no daemons started by package scripts, no recommends, no caches.
  printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
  chmod +x "$rootfs/usr/sbin/policy-rc.d"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' > "$rootfs/etc/apt/apt.conf.d/99dagsmith"
  cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
SOURCES
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  say "importing $BASE"
  tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change "LABEL dagsmith.recipe=$base_key" \
    --change 'ENV DEBIAN_FRONTEND=noninteractive PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
else
  say "reusing $BASE"
fi

# --- 2. The stand-ins (docker build's layer cache makes a rebuild with nothing changed instant) ---
build() {  # build NAME DOCKERFILE
  say "building $1"
  docker build --network host --build-arg "BASE=$BASE" -t "$1" -f "deploy/offline/$2" deploy/offline \
    >"$CACHE/build-${2%.Dockerfile}.log" 2>&1 || { tail -n 30 "$CACHE/build-${2%.Dockerfile}.log" >&2; die "building $1 failed"; }
}
build dagsmith-local/python:3.11 python.Dockerfile
build dagsmith-local/postgres:15 postgres.Dockerfile
build dagsmith-local/rabbitmq:3-management rabbitmq.Dockerfile
build dagsmith-local/prometheus:2 prometheus.Dockerfile

# --- 3. The wheelhouse: every dependency as a wheel for this Python, torch's CPU build included ---
wheels="$CACHE/wheelhouse"
want="$( (cat pyproject.toml; echo "torch==$TORCH_VERSION") | sha256sum | cut -c1-16)"
if [ "$(cat "$wheels/.key" 2>/dev/null)" != "$want" ]; then
  say "building the wheelhouse in $wheels (torch==$TORCH_VERSION, CPU)"
  mkdir -p "$wheels"
  # The same requirement list as the Dockerfile: dependencies plus optional groups but dev/test.
  "$PYTHON" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extra = [d for k, v in p.get("optional-dependencies", {}).items() if k not in ("dev", "test") for d in v]; \
print("\n".join(p["dependencies"] + extra))' > "$CACHE/requirements.txt"
  "$PYTHON" -m pip wheel -q --disable-pip-version-check --find-links "$wheels" -w "$wheels" \
    "torch==$TORCH_VERSION" "setuptools>=69" wheel -r "$CACHE/requirements.txt" >"$CACHE/wheelhouse.log" 2>&1 \
    || { tail -n 30 "$CACHE/wheelhouse.log" >&2; die "building the wheelhouse failed"; }
  echo "$want" > "$wheels/.key"
else
  say "reusing the wheelhouse in $wheels"
fi
# Link (or copy, across file systems) the wheels into the build context.
mkdir -p wheelhouse
find wheelhouse -maxdepth 1 -name '*.whl' -delete
cp -l "$wheels"/*.whl wheelhouse/ 2>/dev/null || cp "$wheels"/*.whl wheelhouse/

# --- 4. The variables ------------------------------------------------------------------------
env_file="$CACHE/images.env"
cat > "$env_file" <<VARS
PYTHON_IMAGE=dagsmith-local/python:3.11
POSTGRES_IMAGE=dagsmith-local/postgres:15
RABBITMQ_IMAGE=dagsmith-local/rabbitmq:3-management
PROMETHEUS_IMAGE=dagsmith-local/prometheus:2
DAGSMITH_PIP_ARGS=--no-index
VARS
say "wrote $env_file"
sed 's/^/export /' "$env_file"
