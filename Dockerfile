# syntax=docker/dockerfile:1
# One image for the node controller (`run`, as root with four capabilities), the waiter (`wait`, as the proxy
# uid) and the webhook (`webhook`). Build: docker build -t IMAGE . (no container engine runs in this project's
# CI, so the image is not built there: see docs/install.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# iptables: both iptables-legacy and iptables-nft (the controller follows the node's choice); nftables: nft;
# iproute2: ip rule/route for TPROXY; util-linux: nsenter/unshare for diagnosis by hand.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      iptables nftables iproute2 util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && python -m compileall -q /usr/local/lib/python3.11/site-packages/istio_pod_network_controller
# Non-root by default (numeric, so runAsNonRoot can verify it): the waiter runs as the proxy uid 1337 anyway,
# and only the DaemonSet asks for root (runAsUser: 0).
USER 1337:1337
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
ENTRYPOINT ["istio-pod-network-controller"]
CMD ["--help"]
