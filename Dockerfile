# syntax=docker/dockerfile:1.7
# Claude Partner Gateway image.
#
#   docker build -t claude-gateway:0.1.0 .
#   docker run --rm -v $PWD/config.yaml:/etc/claude-gateway/config.yaml:ro claude-gateway:0.1.0
#
# Two stages: the builder resolves the locked dependencies (uv.lock) into a
# virtual environment, in a layer of their own that stays cached until the lock
# changes, then installs the project itself as a wheel. The runtime stage gets
# that environment and nothing else: no uv, no compiler, no source tree.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM ${PYTHON_IMAGE} AS builder
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/claude-gateway
WORKDIR /src

# 1. Locked third-party dependencies only: this layer is rebuilt when
#    pyproject.toml or uv.lock change, not when the source does.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-install-project --no-dev

# 2. The project, installed as a wheel (not editable) so the runtime needs no
#    source tree; schemas/ is force-included into the wheel by pyproject.toml.
COPY pyproject.toml uv.lock README.md ./
COPY schemas ./schemas
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
 && chmod -R a+rX,go-w /opt/claude-gateway

FROM ${PYTHON_IMAGE} AS runtime
# Any uid works: the gateway only reads its files (readable by all) and writes
# to /tmp. The image's own user is 10001 in group 0, the convention of
# platforms that assign a uid from a range and always add group 0
# (OpenShift's restricted SCC): what 10001 can do, an assigned uid can do.
ARG UID=10001
LABEL org.opencontainers.image.title="claude-partner-gateway" \
      org.opencontainers.image.description="Kafka-native gateway that shares an organisation's Claude API limits fairly among partners" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN useradd --system --uid "${UID}" --gid 0 --no-create-home \
        --home-dir /tmp --shell /usr/sbin/nologin gateway

# Owned by root, readable and not writable by anyone else (chmod in the
# builder): the process cannot modify its own code, whatever its uid (the pod
# also mounts the root filesystem read-only).
COPY --from=builder /opt/claude-gateway /opt/claude-gateway

# HOME: an arbitrary uid has no passwd entry, and nothing may be written
# outside /tmp (an emptyDir in the pod).
ENV PATH="/opt/claude-gateway/bin:${PATH}" \
    VIRTUAL_ENV=/opt/claude-gateway \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1

USER ${UID}:0
WORKDIR /tmp
EXPOSE 9464

HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2)"]

# The gateway is PID 1 and handles SIGTERM (drain, commit, exit) and SIGHUP
# (reload config and secrets) itself.
ENTRYPOINT ["claude-gateway"]
CMD ["run", "--config", "/etc/claude-gateway/config.yaml"]
