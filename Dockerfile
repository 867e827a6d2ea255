# syntax=docker/dockerfile:1
# One image for the three roles: the node controller (`run`: the DaemonSet sets root and four capabilities),
# the waiter (`wait`: uid 1337, no capabilities, read-only root) and the webhook (`webhook`: uid 65532).
#
# Built in this project's CI by podman from this file (`make image`). No image registry is reachable there, so
# `make image` passes BASE_IMAGE=localhost/ipnc-base:bookworm, a Debian bookworm made by debootstrap with
# python3, iptables, nftables and iproute2 (Makefile, docs/install.md). Everyone else gets the public base:
#   docker build -t REGISTRY/istio-pod-network-controller:0.1.0 .     (or podman build)
# Both stages start from the same BASE_IMAGE, so the venv's interpreter link is valid in the final image.
# The final image holds the base, the rule tools, and a venv with the product and its dependencies: no
# compiler, no pip, no package caches, no test lab (the context is pyproject.toml, README.md and src/ only).
# On the public python:3.11-slim base, the base's own pip stays in its layer; the Debian base has none.

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Debian's python3 has no ensurepip without python3-venv: installed in this throw-away stage only.
RUN python3 -c "import ensurepip" 2>/dev/null || { \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv; }
RUN python3 -m venv /opt/ipnc
WORKDIR /src
# Dependencies first (their layer survives source edits), read from pyproject.toml itself. PIP_OPTIONS: empty
# = PyPI; `make image` passes "--no-index --find-links /wheels" and mounts wheels the host downloaded, so the
# build itself fetches nothing from PyPI.
ARG PIP_OPTIONS=""
COPY pyproject.toml README.md ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && /opt/ipnc/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_OPTIONS} \
      -r /tmp/requirements.txt "setuptools>=68"
COPY src ./src
# The product's wheel, built from the repository root (only the istio_pod_network_controller package), then
# the installers removed from the venv: nothing in the final image can install anything.
RUN /opt/ipnc/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation . \
 && /opt/ipnc/bin/python -m pip uninstall -y -q setuptools pip \
 && find /opt/ipnc -name '*.dist-info' -prune -o -name 'tests' -type d -prune -exec rm -rf {} + \
 && /opt/ipnc/bin/python -m compileall -q /opt/ipnc/lib

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="istio-pod-network-controller" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/istio-pod-network-controller/istio-pod-network-controller"
# iptables: iptables-legacy and iptables-nft (the controller follows the node's choice); nftables: nft;
# iproute2: ip rule/route for TPROXY; util-linux (essential in Debian): nsenter for diagnosis by hand. The
# local base has them already (nothing is fetched then). Then no setuid/setgid file is left: the DaemonSet
# allows privilege escalation only because Kubernetes refuses allowPrivilegeEscalation=false with SYS_ADMIN.
RUN if ! dpkg -s iptables nftables iproute2 >/dev/null 2>&1; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables nftables iproute2 \
      && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    fi \
 && find / -xdev -type f -perm /6000 -exec chmod ug-s {} +
COPY --from=build /opt/ipnc /opt/ipnc
ENV PATH=/opt/ipnc/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default (numeric, so runAsNonRoot can verify it): the waiter runs as the proxy uid 1337; the
# DaemonSet asks for root (runAsUser: 0) and the webhook for 65532.
USER 1337:1337
ENTRYPOINT ["/opt/ipnc/bin/istio-pod-network-controller"]
CMD ["--help"]
