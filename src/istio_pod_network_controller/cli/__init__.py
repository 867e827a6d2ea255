"""The `istio-pod-network-controller` command.

Subcommands are imported lazily: the waiter (`wait`/`init`) runs in every mesh pod's start-up path and must
not pay for importing the controller or the rule renderers.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

#: subcommand name -> "module:attribute" of its click command, relative to this package.
SUBCOMMANDS: dict[str, str] = {
    "rules": ".rules:rules",
    "wait": ".wait:wait",
    "init": ".wait:init",
    "run": ".run:run",
    "inject": ".inject:inject",
    "webhook": ".webhook:webhook",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name, __name__)
        command: click.Command = getattr(module, attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Install Istio's traffic capture into mesh pods from the node, so mesh pods need no NET_ADMIN."""


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="istio-pod-network-controller")
