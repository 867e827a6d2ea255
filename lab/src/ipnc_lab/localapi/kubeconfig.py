"""Writes a kubeconfig that ordinary clients (kubectl, lightkube) use unchanged."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import yaml


def build(server: str, token: str, *, user: str = "admin", ca_pem: bytes | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {"server": server}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "localapi", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": f"localapi-{user}",
                "context": {"cluster": "localapi", "user": user, "namespace": "default"},
            }
        ],
        "current-context": f"localapi-{user}",
        "preferences": {},
    }


def write(path: Path, server: str, token: str, *, user: str = "admin", ca_pem: bytes | None = None) -> Path:
    """Write the kubeconfig (mode 0600, it holds a token) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(build(server, token, user=user, ca_pem=ca_pem), sort_keys=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path
