#!/usr/bin/env bash
# Make sure Postgres (127.0.0.1:5432) and RabbitMQ (127.0.0.1:5672) answer, starting them if needed:
# the local Debian services when they are installed, otherwise the two containers from
# deploy/test-services.yml. Exits non-zero with what is missing if neither works.
set -euo pipefail
cd "$(dirname "$0")/.."

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local port=$1 what=$2 deadline=$((SECONDS + ${3:-60}))
  until port_open "$port"; do
    if [ $SECONDS -ge $deadline ]; then echo "services: $what did not come up on 127.0.0.1:$port" >&2; return 1; fi
    sleep 0.5
  done
}

if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "services: starting Postgres" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  elif command -v docker >/dev/null 2>&1; then
    docker compose -f deploy/test-services.yml up -d --wait postgres
  else
    echo "services: Postgres is not running on 127.0.0.1:5432 and cannot be started here (install postgresql or docker)" >&2
    exit 1
  fi
  wait_port 5432 Postgres 60
fi

if ! port_open 5672; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "services: starting RabbitMQ" >&2
    rabbitmq-server -detached || true
  elif command -v docker >/dev/null 2>&1; then
    docker compose -f deploy/test-services.yml up -d --wait rabbitmq
  else
    echo "services: RabbitMQ is not running on 127.0.0.1:5672 and cannot be started here (install rabbitmq-server or docker)" >&2
    exit 1
  fi
  wait_port 5672 RabbitMQ 120
  # The port opens before the broker accepts logins; rabbitmqctl knows when it is really up.
  if command -v rabbitmqctl >/dev/null 2>&1; then timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true; fi
fi
