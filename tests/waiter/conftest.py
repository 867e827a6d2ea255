"""Fixtures for the waiter tests (helpers live in waiter_helpers.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from waiter_helpers import PROXY, StartWaiter, Waiter, make_readable, waiter_argv

from ipnc_lab.sim.runtime import SYSTEM_PYTHON, build_runtime


@pytest.fixture(scope="session")
def waiter_runtime() -> Iterator[Path]:
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run the waiter as another uid")
    base = build_runtime()
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A world-readable directory for annotation files and logs."""
    path = Path(tempfile.mkdtemp(prefix="ipnc-waiter-"))
    make_readable(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_waiter(waiter_runtime: Path, workdir: Path) -> Iterator[StartWaiter]:
    """start_waiter(ns, args, uid=, gid=, command=, env=) -> Waiter; every started waiter is killed after."""
    started: list[Waiter] = []

    def start(
        ns: str,
        args: list[str],
        *,
        uid: int = PROXY,
        gid: int = PROXY,
        command: str = "wait",
        env: Mapping[str, str] | None = None,
    ) -> Waiter:
        log_path = workdir / f"waiter{len(started)}.log"
        handle = open(log_path, "wb")  # noqa: SIM115 - closed by Waiter.stop
        environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(waiter_runtime), **(env or {})}
        now = time.monotonic()
        proc = subprocess.Popen(
            waiter_argv(ns, args, uid=uid, gid=gid, command=command),
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        waiter = Waiter(proc, log_path, handle, now)
        started.append(waiter)
        return waiter

    try:
        yield start
    finally:
        for waiter in started:
            waiter.stop()
