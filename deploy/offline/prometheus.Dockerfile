# Local stand-in for the official prom/prometheus image, from Debian bookworm's Prometheus (2.42)
# with promtool. Same entrypoint (/bin/prometheus), user (nobody) and data directory (/prometheus).
# Debian's build has no web UI; the HTTP API, which the tests use, is complete.
ARG BASE=dagsmith-local/debian:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus /etc/prometheus \
 && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
