"""`ipnc-lab demo`: see the whole system work on this machine (root)."""

from __future__ import annotations

import os
import threading

import click

BACKENDS = ("auto", "legacy", "nft", "nftables")


@click.command()
@click.option("--pods", type=click.IntRange(min=6), default=6, show_default=True, help="pods on the node")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option(
    "--keep", is_flag=True, help="leave everything running until Ctrl-C and print how to explore it"
)
def demo(pods: int, backend: str, keep: bool) -> None:
    """Simulate one node with mesh and non-mesh pods; run the real controller and waiters; send traffic."""
    from rich.console import Console

    from .demo.report import print_report
    from .demo.run import Demo, DemoResult, run_demo

    if os.geteuid() != 0:
        raise click.ClickException("the demo creates network namespaces and cgroups: run it as root")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)

    def hold(demo_run: Demo) -> None:
        partial = DemoResult(list(demo_run.outcomes.values()), True, demo_run.controller_requests(), None)
        print_report(console, partial)
        console.print("\nExplore (Ctrl-C cleans everything up):")
        for line in demo_run.explore_commands():
            console.print(f"  {line}", markup=False, highlight=False)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            console.print("cleaning up")

    try:
        if keep:  # one run, held open for exploring; its progress is logged line by line
            result = run_demo(pods, backend, console.log, keep=hold)
        else:
            with console.status("starting") as status:
                result = run_demo(pods, backend, status.update, keep=None)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; everything the demo created was removed") from None
    print_report(console, result)
