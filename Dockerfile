# syntax=docker/dockerfile:1
#
# The outbox-cdc relay image. Two stages:
#   builder  builds the outbox-cdc wheel and collects the wheels of its runtime dependencies
#            (all of them ship binary wheels: nothing is compiled, no compiler is installed);
#   final    installs only those wheels, offline, on a fresh slim Python; runs as a non-root user.
#
#   docker build -t outbox-cdc .
#   docker build --build-arg OUTBOX_CDC_EXTRAS=confluent -t outbox-cdc .   # confluent-kafka too
#   docker run --rm -e OUTBOX_CDC_DATABASE_URL=... -e OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS=... outbox-cdc
#
# The container runs deploy/relay-entrypoint.sh: `outbox-cdc init`, then `outbox-cdc start`.
# /metrics, /healthz and /readyz are served on OUTBOX_CDC_HTTP_PORT (8000).
#
# The base image is pinned to a Python patch release and a Debian release. To pin it to a digest
# as well: docker buildx imagetools inspect python:3.11.15-slim-bookworm, then build with
# --build-arg PYTHON_IMAGE=python:3.11.15-slim-bookworm@sha256:<index digest>.
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG OUTBOX_CDC_EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ONLY_BINARY=:all:

WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox_cdc ./outbox_cdc

# /wheels: the outbox-cdc wheel and the wheels of its dependencies (plus the chosen extras').
# Dependencies must come as binary wheels (PIP_ONLY_BINARY); the project itself is built by
# hatchling, pure Python.
RUN python -m pip wheel --no-binary outbox-cdc --wheel-dir /wheels \
        ".${OUTBOX_CDC_EXTRAS:+[$OUTBOX_CDC_EXTRAS]}" \
 && ls -l /wheels

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS final

ARG OUTBOX_CDC_EXTRAS=""
LABEL org.opencontainers.image.title="outbox-cdc" \
      org.opencontainers.image.description="Transactional outbox relay: PostgreSQL WAL (wal2json) or polling, to Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OUTBOX_CDC_HTTP_PORT=8000 \
    OUTBOX_CDC_LOG_FORMAT=json

# The relay needs no home, no shell login and no writable files.
RUN groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid outbox --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin outbox

# Offline install from the builder's wheels (bind-mounted: they never become a layer here).
# The versions are pinned by what the builder collected; --no-index reaches nothing else.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links=/wheels \
        "outbox-cdc${OUTBOX_CDC_EXTRAS:+[$OUTBOX_CDC_EXTRAS]}" \
 && outbox-cdc --version

COPY --chmod=0755 deploy/relay-entrypoint.sh /usr/local/bin/outbox-cdc-entrypoint

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000

# Liveness: /healthz answers 200 while the relay's loop runs (urllib: the slim image has no curl).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('OUTBOX_CDC_HTTP_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["/usr/local/bin/outbox-cdc-entrypoint"]
