"""The top-level command: `--help` and `--version` import no subcommand, and the help table is the truth."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from istio_pod_network_controller.cli import SUBCOMMANDS

PROBE = """
import sys
from istio_pod_network_controller.cli import main
try:
    main([{arg!r}])
except SystemExit:
    pass
print(sorted(m for m in ("aiohttp", "lightkube", "prometheus_client", "yaml", "httpx2") if m in sys.modules))
print(sorted(m for m in sys.modules if m.startswith("istio_pod_network_controller.")))
"""


@pytest.mark.parametrize("arg", ["--help", "--version"])
def test_help_and_version_import_nothing_heavy(arg: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(arg=arg)], capture_output=True, text=True, timeout=60, check=True
    )
    *output, heavy, ours = done.stdout.strip().splitlines()
    assert heavy == "[]"
    assert ours == "['istio_pod_network_controller.cli', 'istio_pod_network_controller.cli.loglevel']"
    if arg == "--version":
        assert output == ["istio-pod-network-controller 0.1.0"]
    else:
        assert all(name in "\n".join(output) for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_listed_help_is_the_commands_own(name: str) -> None:
    module, attr = SUBCOMMANDS[name][0].split(":")
    command = getattr(importlib.import_module(module, "istio_pod_network_controller.cli"), attr)
    assert command.get_short_help_str(limit=10**6) == SUBCOMMANDS[name][1]
