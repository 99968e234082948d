# One image for every Dagsmith service; the command picks the service:
#   docker run IMAGE api | controller | evaluator | executor --types 'text.*' | migrate | trainer
#
# Build arguments:
#   PYTHON_IMAGE       base image (default: the official slim Python 3.11 image). Any Debian-like
#                      image with python3 and its venv module works (scripts/offline-images.sh
#                      builds one from Debian's packages for machines without a registry).
#   TORCH_VERSION      PyTorch release, installed as the CPU build (the trainer uses it).
#   TORCH_INDEX_URL    where the CPU builds are published.
#   PIP_ARGS           extra pip arguments, e.g. "--no-index" to install only from ./wheelhouse/.
# Wheels placed in ./wheelhouse/ are preferred to downloads (see scripts/offline-images.sh).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/dagsmith
COPY wheelhouse/ /wheelhouse/
# torch first and on its own: from the CPU index only, so that no CUDA build is ever chosen.
RUN /opt/dagsmith/bin/pip install --find-links /wheelhouse $PIP_ARGS --index-url "$TORCH_INDEX_URL" \
      "torch==${TORCH_VERSION}"
# torch's C++ headers, test binaries and protoc are for building extensions, not for running: -190 MB.
RUN site="$(/opt/dagsmith/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && rm -rf "$site/torch/include" "$site/torch/test" \
 && find "$site/torch/bin" -type f ! -name torch_shm_manager -delete \
 && /opt/dagsmith/bin/python -c 'import torch; assert float(torch.ones(3) @ torch.ones(3)) == 3.0'
# Dependencies next (a layer that changes only with pyproject.toml), then the code. Optional
# dependency groups other than dev/test (e.g. the trainer's) are part of the image.
COPY pyproject.toml /src/
RUN python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
extra = [d for k, v in p.get("optional-dependencies", {}).items() if k not in ("dev", "test") for d in v]; \
print("\n".join(p["dependencies"] + extra))' > /tmp/requirements.txt
RUN /opt/dagsmith/bin/pip install --find-links /wheelhouse $PIP_ARGS -r /tmp/requirements.txt "setuptools>=69" wheel
COPY dagsmith/ /src/dagsmith/
COPY api/ /src/api/
COPY controller/ /src/controller/
COPY executors/ /src/executors/
COPY evaluator/ /src/evaluator/
COPY trainer/ /src/trainer/
RUN /opt/dagsmith/bin/pip install --no-deps --no-build-isolation /src \
 && /opt/dagsmith/bin/pip uninstall -y setuptools wheel

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 dagsmith \
 && useradd --system --uid 10001 --gid dagsmith --home-dir /home/dagsmith --create-home --shell /usr/sbin/nologin dagsmith
COPY --from=build /opt/dagsmith /opt/dagsmith
ENV PATH=/opt/dagsmith/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DAGSMITH_API_HOST=0.0.0.0 \
    DAGSMITH_LOG_FORMAT=json
WORKDIR /home/dagsmith
USER dagsmith
EXPOSE 8000 9101 9102 9103 9104
ENTRYPOINT ["dagsmith"]
CMD ["--help"]
