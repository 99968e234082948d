# Local stand-in for the official rabbitmq:*-management image, from Debian bookworm's RabbitMQ
# with the management plugin. RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS create the first
# user, data lives in /var/lib/rabbitmq (node rabbit@<hostname>), AMQP on 5672, UI on 15672,
# rabbitmq-diagnostics on the PATH.
ARG BASE=dagsmith-local/debian:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* \
 && rabbitmq-plugins enable --offline rabbitmq_management rabbitmq_prometheus \
 && mkdir -p /var/lib/rabbitmq /var/log/rabbitmq \
 && chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq /etc/rabbitmq
COPY rabbitmq-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=-
USER rabbitmq
EXPOSE 5672 15672 15692
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["rabbitmq-server"]
