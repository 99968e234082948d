# Local stand-in for the official postgres image, from Debian bookworm's PostgreSQL 15.
# Same contract as far as docker-compose.yml uses it: POSTGRES_USER / POSTGRES_PASSWORD /
# POSTGRES_DB create the role and database on first start (POSTGRES_HOST_AUTH_METHOD=trust allows
# no password), data in /var/lib/postgresql/data,
# pg_isready on the PATH, port 5432.
ARG BASE=dagsmith-local/debian:bookworm
FROM ${BASE}
RUN mkdir -p /etc/postgresql-common \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
RUN mkdir -p "$PGDATA" /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
 && chmod 700 "$PGDATA"
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
