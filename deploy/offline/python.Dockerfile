# Local stand-in for the official python:3.11-slim image: Debian bookworm's Python 3.11 with venv.
# Built by scripts/offline-images.sh on machines that cannot pull images.
ARG BASE=dagsmith-local/debian:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python
ENV LANG=C.UTF-8
CMD ["python3"]
