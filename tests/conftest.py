"""Suite-wide rules: `root` tests run only as root, under CI=true none of them may be skipped, and a run
that leaves a network namespace, cgroup or process of its own behind fails."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import settings

from ipnc_lab.localapi import LocalAPIServer
from ipnc_lab.localapi.server import ThreadedServer
from ipnc_lab.sim import leftovers
from ipnc_lab.sim.cluster import issued_names, unique_name

settings.register_profile("default", max_examples=60)
settings.register_profile("soak", max_examples=10_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_skipped_root: list[str] = []
_leftovers: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs root (network namespaces, iptables, cgroups)"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "root" in report.keywords:
        _skipped_root.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") == "true" and _skipped_root:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    # Every fixture is torn down by now: what the run made (names from unique_name) must be gone.
    _leftovers.extend(leftovers.report(issued_names()))
    if _leftovers:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _leftovers:
        terminalreporter.write_line(f"{len(_leftovers)} leftover(s) of this run: FAILS the run", red=True)
        for line in _leftovers:
            terminalreporter.write_line(f"  {line}")
    if _skipped_root:
        verdict = "FAILS the run (CI=true)" if os.environ.get("CI") == "true" else "allowed outside CI"
        terminalreporter.write_line(f"{len(_skipped_root)} root test(s) skipped: {verdict}", red=True)
        for nodeid in _skipped_root:
            terminalreporter.write_line(f"  {nodeid}")


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A fresh named network namespace with lo up, deleted afterwards whatever happens."""
    name = unique_name("ipnc")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def api() -> Iterator[ThreadedServer]:
    """A fresh, empty API emulator on loopback, stopped afterwards (a test dir may define its own `api`)."""
    server = LocalAPIServer().start_in_thread()
    try:
        yield server
    finally:
        server.stop()
