# syntax=docker/dockerfile:1
# imagerecognize-gateway container image. Build: docker build -t imagerecognize-gateway .
# Run and configure: docs/container.md.

# Both stages must use the same Python: the venv copied below links to the base's interpreter.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- builder: install the package and its dependencies into a self-contained venv ---------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /src
# Metadata first: the package sources change more often than these.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# A non-editable install: the venv holds a copy of the package, /src is not needed after.
# Extras: uvloop (faster event loop, used when importable) and redis, so one image serves
# storage.backend = "sqlite" and "redis" alike.
RUN /opt/venv/bin/pip install --no-cache-dir ".[uvloop,redis]" \
    && /opt/venv/bin/gateway --version

# --- runtime: only the venv, the config and an unprivileged user --------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# A fixed numeric uid, so orchestrators can check runAsNonRoot and bind mounts can be chowned.
# /data is created and owned here, so a new named volume starts out writable by the gateway.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && mkdir -p /data /etc/gateway \
    && chown gateway:gateway /data

COPY --from=builder /opt/venv /opt/venv
# Listens on 0.0.0.0:8080 and stores in /data/gateway.db; mount your own over it.
COPY config.docker.toml /etc/gateway/config.toml

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

# Exec form: the gateway is PID 1 and receives SIGTERM itself, then drains
# (server.drain_timeout_s); give `docker stop` a longer grace period than that.
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/config.toml"]
