"""The demo table: per pod, selected and why, initialized when, the waiter, the traffic, the Events."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..sim.traffic import Reply
from .run import DemoResult, PodOutcome


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"


def _traffic(reply: Reply | None, captured: bool | None, expect: bool) -> str:
    if reply is None:
        return "[dim]n/a[/]"
    if not reply.ok:
        return f"[yellow]no answer ({reply.error})[/]"
    where = f"{reply.label}" + (f" orig {reply.orig[0]}:{reply.orig[1]}" if reply.orig else "")
    colour = "green" if captured == expect else "red"
    return f"[{colour}]{'captured' if captured else 'direct'}[/] → {where}"


def _waiter(outcome: PodOutcome) -> str:
    if not outcome.pod.runs_waiter:
        return "[dim]none[/]"
    if outcome.waiter_exit is None:
        return "[yellow]running[/]"
    colour = "green" if (outcome.waiter_exit == 0) == outcome.pod.mesh else "red"
    return f"[{colour}]exit {outcome.waiter_exit}[/] after {_ms(outcome.waiter_ms)}"


def table(result: DemoResult) -> Table:
    view = Table(title="istio-pod-network-controller demo", show_lines=True)
    for column in (
        "pod",
        "selected: why",
        "initialized",
        "waiter",
        "inbound :8080",
        "outbound :9090",
        "Events",
    ):
        view.add_column(column, overflow="fold")
    for o in result.outcomes:
        selected = "[green]mesh[/]" if o.pod.mesh else "[dim]not mesh[/]"
        view.add_row(
            f"{o.pod.namespace}/{o.pod.name}\n{o.ip or 'host network'}",
            f"{selected}: {o.pod.why}",
            _ms(o.marked_ms),
            _waiter(o),
            _traffic(o.inbound, o.inbound_captured, o.pod.mesh),
            _traffic(o.outbound, o.outbound_captured, o.pod.mesh),
            "\n".join(event.split(":")[0] for event in o.events) or "[dim]none[/]",
        )
    return view


def print_report(console: Console, result: DemoResult) -> None:
    console.print(table(result))
    for outcome in result.outcomes:
        for event in outcome.events:
            console.print(
                f"  {outcome.pod.namespace}/{outcome.pod.name}: {event}", markup=False, highlight=False
            )
    requests = ", ".join(f"{count} {what}" for what, count in sorted(result.controller_requests.items()))
    console.print(f"controller API requests: {requests or 'none'}")
    verdict = "[green]unchanged[/]" if result.host_rules_unchanged else "[red]CHANGED[/]"
    console.print(f"host network namespace rules: {verdict}")
    if result.status_command:
        console.print(f"\n$ {result.status_command}", markup=False, highlight=False)
        console.print(result.status_output.rstrip(), markup=False, highlight=False)
