"""The `ipnc-lab` command: the demo and the API emulator, apart from the product's own command."""

from __future__ import annotations

import sys
from typing import Any

import click

from .cli_demo import demo
from .cli_local_apiserver import local_apiserver


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The istio-pod-network-controller test lab (never installed on a cluster)."""


cli.add_command(demo)
cli.add_command(local_apiserver)


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="ipnc-lab")
