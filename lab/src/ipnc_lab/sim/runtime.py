"""A copy of the product, the lab and click that any uid can import, for processes run as the pod's users.

The venv may sit under a folder other uids cannot enter (root's pyenv, a CI clone under /root), while
Debian's /usr/bin/python3 is world-readable. The waiter and the simulated workloads run as uid 1337/1000
with that interpreter and PYTHONPATH pointing at this 0755 copy.
"""

from __future__ import annotations

import compileall
import os
import shutil
import tempfile
from pathlib import Path

import click

import istio_pod_network_controller

SYSTEM_PYTHON = "/usr/bin/python3"


def _skip(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))]


def build_runtime(prefix: str = "ipnc-runtime-") -> Path:
    """Copy the product, the lab and click into a fresh 0755 folder, byte-compiled; the caller removes it."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    lab = Path(__file__).resolve().parent.parent
    for package in (
        Path(istio_pod_network_controller.__file__).resolve().parent,
        lab,
        Path(click.__file__).resolve().parent,
    ):
        shutil.copytree(package, base / package.name, ignore=_skip)
    compileall.compile_dir(base, quiet=1)
    for root, _, files in os.walk(base):
        os.chmod(root, 0o755)  # noqa: S103 - readable by the pod's uids is the point
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return base


def runtime_env(base: Path) -> dict[str, str]:
    """The environment a process started with SYSTEM_PYTHON needs to import from `base`."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(base), "PYTHONDONTWRITEBYTECODE": "1"}
