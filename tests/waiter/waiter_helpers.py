"""Helpers for the waiter tests: a runtime other uids can read, a waiter started like a real init container.

The waiter runs inside a test netns as uid/gid 1337 with an empty capability set (setpriv), using Debian's
world-readable /usr/bin/python3 and a copy of the package and click in a 0755 temp dir: the venv's pyenv
python under /root and the clone itself may be unreadable for uid 1337.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ipnc_lab.sim.runtime import SYSTEM_PYTHON
from istio_pod_network_controller.dataplane.apply import apply as dp_apply
from istio_pod_network_controller.dataplane.netns import PinnedNetns
from istio_pod_network_controller.settings.spec import build_spec

PROXY = 1337


def make_readable(base: Path) -> None:
    """Directories 0755, files 0644: the waiter runs as uid 1337 and must read (never write) all of it."""
    os.chmod(base, 0o755)  # noqa: S103 - world-readable on purpose
    for root, dirs, files in os.walk(base):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)  # noqa: S103
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def write_annotations(path: Path, annotations: Mapping[str, str]) -> Path:
    path.write_text("".join(f'{k}="{v}"\n' for k, v in annotations.items()))
    os.chmod(path, 0o644)
    return path


@dataclass
class Waiter:
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_handle: IO[bytes]
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"{text!r} not logged; rc={self.proc.poll()} log:\n{self.log()}")

    def finish(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_handle.close()


StartWaiter = Callable[..., Waiter]
"""The start_waiter fixture: (ns, args, uid=, gid=, command=, env=) -> Waiter."""


def waiter_argv(
    ns: str, args: list[str], *, uid: int = PROXY, gid: int = PROXY, command: str = "wait"
) -> list[str]:
    return [
        "ip", "netns", "exec", ns,
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
        SYSTEM_PYTHON, "-m", "istio_pod_network_controller", command, *args,
    ]  # fmt: skip


def apply_rules(
    ns: str,
    annotations: Mapping[str, str] | None = None,
    backend: str = "legacy",
    defaults: Mapping[str, str] | None = None,
) -> None:
    spec = build_spec(annotations or {}, defaults or {})
    with PinnedNetns.open_path(f"/run/netns/{ns}") as pinned:
        dp_apply(pinned, spec, backend)  # type: ignore[arg-type]
