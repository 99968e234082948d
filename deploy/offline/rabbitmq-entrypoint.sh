#!/bin/sh
# Write rabbitmq.conf from the environment (the default user applies when the node's database is
# created, as with the official image), then run the broker in the foreground.
set -eu
{
  echo "listeners.tcp.default = 5672"
  echo "management.tcp.port = 15672"
  echo "loopback_users = none"
  if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then
    echo "default_user = ${RABBITMQ_DEFAULT_USER}"
    echo "default_pass = ${RABBITMQ_DEFAULT_PASS:?RABBITMQ_DEFAULT_PASS must be set with RABBITMQ_DEFAULT_USER}"
    echo "default_user_tags.administrator = true"
    echo "default_permissions.configure = .*"
    echo "default_permissions.read = .*"
    echo "default_permissions.write = .*"
  fi
} > /etc/rabbitmq/rabbitmq.conf
exec "$@"
