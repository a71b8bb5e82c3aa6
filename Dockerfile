# syntax=docker/dockerfile:1
# mcp-heal-proxy as a sidecar: a small image, a non-root user, state on /data, signals reach the proxy.
#
#   docker build -t mcp-heal-proxy .
#   docker run --rm -p 127.0.0.1:8787:8787 -v mcp-heal-proxy-data:/data \
#       -e MCP_HEAL_PROXY_UPSTREAM=https://mcp.example.com/mcp mcp-heal-proxy
#
# A host directory in place of the named volume must be writable by uid 10001: chown 10001 DIR.
#
# Name the upstream(s) in one of three ways:
#   - an argument:      docker run ... mcp-heal-proxy --upstream https://mcp.example.com/mcp
#   - the environment:  -e MCP_HEAL_PROXY_UPSTREAM=https://mcp.example.com/mcp
#   - a mounted file:   -v ./config.toml:/etc/mcp-heal-proxy/config.toml:ro
#                       -e MCP_HEAL_PROXY_CONFIG=/etc/mcp-heal-proxy/config.toml
# Arguments after the image name are appended to the ENTRYPOINT below; the last occurrence of a flag
# wins, and flags beat the environment, which beats the file. Move the port with MCP_HEAL_PROXY_PORT
# (the HEALTHCHECK reads it too), not with --port or the file.

# Both stages start from BASE_IMAGE: python:3.11-slim for everyone; a build that cannot reach an image
# registry names a local stand-in (the tests do: scripts/container-base).
ARG BASE_IMAGE=python:3.11-slim

# --- build: the package and its dependencies in a virtualenv ----------------------------------------
FROM ${BASE_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first, read from pyproject.toml alone: this layer stays cached when only the code
# changes, so a rebuild installs just the package itself.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" >requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --requirement requirements.txt
COPY README.md ./
COPY mcp_heal_proxy ./mcp_heal_proxy
# The runtime needs neither pip nor setuptools: drop them from the venv that gets copied.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/pip uninstall --yes setuptools pip

# --- runtime: the same slim base plus the virtualenv, nothing else ----------------------------------
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="mcp-heal-proxy" \
      org.opencontainers.image.description="Keeps MCP Streamable HTTP sessions alive across upstream expiry and restarts." \
      org.opencontainers.image.licenses="MIT"

# tini as PID 1: the kernel drops any signal that PID 1 has no handler for, so with the proxy itself as
# PID 1 a `docker stop` during its start-up (before it installs its handlers) was lost and ended in
# SIGKILL after the timeout. tini forwards SIGTERM to the proxy and exits with its status; `-e 143`
# makes a proxy that SIGTERM ended before its handlers were in place exit 0 too, as asked. Its version
# is whatever the base image's Debian release ships. ca-certificates: the system CAs https upstreams are
# verified against (a private CA is added with MCP_HEAL_PROXY_CA_FILE or ca_file, see the user guide).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid: Kubernetes' runAsNonRoot can verify it, and a host directory can be chowned to it.
# /data belongs to group 0 as well, writable by it: a platform that runs the image under an arbitrary
# uid in group 0 (OpenShift does) can still write the session store. A new named volume copies this.
RUN groupadd --system --gid 10001 mcp \
    && useradd --system --uid 10001 --gid mcp --home-dir /data --no-create-home --shell /usr/sbin/nologin mcp \
    && mkdir /data \
    && chown 10001:0 /data \
    && chmod 0775 /data

COPY --from=build /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The session store: on a volume, so client-facing session ids survive a container restart.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8787

# slim has no curl: ask /healthz with the standard library (port 8787 unless MCP_HEAL_PROXY_PORT says otherwise).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MCP_HEAL_PROXY_PORT', '8787'), timeout=4)"]

# Exec form, no shell: tini (PID 1) hands `docker stop`'s SIGTERM to the proxy, which stops gracefully.
# --host 0.0.0.0 is right only inside a container; publish the port on 127.0.0.1 on the host.
# These flags sit in the ENTRYPOINT, not the CMD, so that `docker run IMAGE --upstream URL` keeps them.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "-e", "143", "--", "mcp-heal-proxy", "serve", "--host", "0.0.0.0", "--state", "/data/sessions.db"]
