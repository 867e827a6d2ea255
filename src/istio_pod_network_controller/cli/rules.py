"""`istio-pod-network-controller rules render|apply|verify|clean|find-netns`: the data plane by hand."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from ..dataplane import apply as dataplane
from ..dataplane.discovery import find_pod_netns
from ..dataplane.netns import PinnedNetns
from ..errors import ControllerError
from ..rules import iptables, nftables, plan
from ..settings.downward import read_annotations
from ..settings.spec import InterceptSpec, IPv6Policy, build_spec
from .spec_options import source_name, spec_options

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def pod_spec_options(func: F) -> F:
    """The spec options plus --annotations, a pod's own annotations layered on top."""
    func = spec_options()(func)
    return click.option(
        "--annotations",
        "annotations_file",
        type=click.Path(dir_okay=False),
        help='Pod annotations layered on top: a downward-API file (key="value" lines) or a JSON object.',
    )(func)


@dataclass(frozen=True, slots=True)
class Target:
    """The namespace options of apply/verify/clean, and the one way they act on it."""

    netns_path: str | None
    pid: int | None
    backend: str
    proc_root: str
    allow_host_netns: bool

    def run(self, action: Callable[..., T], *args: object) -> tuple[str, T]:
        """Open the namespace and run a dataplane action; our errors end the command (exit 2)."""
        if (self.netns_path is None) == (self.pid is None):
            raise click.UsageError("give exactly one of --netns PATH or --pid PID")
        try:
            if self.netns_path is not None:
                handle = PinnedNetns.open_path(self.netns_path)
            else:
                handle = PinnedNetns.open_pid(int(self.pid or 0), self.proc_root)
            with handle:
                options = {"allow_host": self.allow_host_netns, "proc_root": self.proc_root}
                return handle.description, action(handle, *args, _backend(self.backend), **options)
        except ControllerError as exc:
            _fail(exc)


def target_options(func: Callable[..., None]) -> Callable[..., None]:
    """The namespace options, handed to the command as one `target: Target`."""

    @functools.wraps(func)
    def command(
        *,
        netns_path: str | None,
        pid: int | None,
        backend: str,
        proc_root: str,
        allow_host_netns: bool,
        **kwargs: Any,
    ) -> None:
        func(target=Target(netns_path, pid, backend, proc_root, allow_host_netns), **kwargs)

    options = [
        click.option("--netns", "netns_path", metavar="PATH", help="/run/netns/NAME or /proc/PID/ns/net"),
        click.option("--pid", type=int, help="a process inside the target network namespace"),
        click.option(
            "--backend",
            type=click.Choice(dataplane.BACKEND_CHOICES),
            default="auto",
            show_default=True,
            help="auto keeps what the namespace already uses, else follows the node (legacy if it has "
            "legacy tables, else nft)",
        ),
        click.option("--proc-root", default="/proc", show_default=True, help="the host's /proc"),
        click.option(
            "--allow-host-netns",
            is_flag=True,
            help="permit changing the node's own network namespace (dangerous)",
        ),
    ]
    for option in options:
        command = option(command)
    return command


def _spec(annotations_file: str | None, settings: dict[str, str | None]) -> InterceptSpec:
    annotations = read_annotations(annotations_file) if annotations_file else {}
    defaults = {name: value for name, value in settings.items() if value is not None}
    return build_spec(annotations, defaults, default_source=source_name)


def _parsed_spec(annotations_file: str | None, settings: dict[str, str | None]) -> InterceptSpec:
    try:
        return _spec(annotations_file, settings)
    except ControllerError as exc:
        _fail(exc)


def _fail(exc: Exception) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    raise SystemExit(2)


@click.group()
def rules() -> None:
    """Render, apply, verify or remove the capture rules of one network namespace."""


@rules.command()
@pod_spec_options
@click.option(
    "--format",
    "output",
    type=click.Choice(["iptables", "nftables", "json"]),
    default="iptables",
    show_default=True,
)
def render(annotations_file: str | None, output: str, **settings: str | None) -> None:
    """Print the rules a pod with these settings gets (IPv6 `auto` renders as `block` without addresses)."""
    spec = _parsed_spec(annotations_file, settings)
    if spec.ipv6 is IPv6Policy.AUTO:
        spec = spec.with_ipv6(False)
    ruleset = plan.build(spec)
    if output == "json":
        click.echo(json.dumps({"spec": spec.describe(), "fingerprint": spec.fingerprint()}, indent=2))
    elif output == "nftables":
        click.echo(nftables.render(ruleset), nl=False)
    else:
        for family in ruleset.families:
            click.echo(f"# IPv{family.family}: {'ip' if family.family == 4 else 'ip6'}tables-restore input")
            click.echo(iptables.render(family), nl=False)
        for route in ruleset.routes:
            click.echo(
                f"# ip -{route.family} rule add fwmark {route.mark} lookup {route.table}; "
                f"ip -{route.family} route add local default dev lo table {route.table}"
            )


def _backend(name: str) -> dataplane.BackendChoice:
    for choice in dataplane.BACKEND_CHOICES:
        if choice == name:
            return choice
    raise click.BadParameter(f"unknown backend {name!r}")


@rules.command()
@pod_spec_options
@target_options
def apply(target: Target, annotations_file: str | None, **settings: str | None) -> None:
    """Install the rules (idempotent; replaces ours, leaves foreign rules alone)."""
    spec = _parsed_spec(annotations_file, settings)
    where, result = target.run(dataplane.apply, spec)
    ipv6 = "captured" if result.ipv6_captured else "blocked"
    click.echo(
        f"applied to {where} ({result.netns}) with {result.backend} "
        f"in {result.seconds * 1000:.1f} ms; IPv6 {ipv6}; spec {result.fingerprint}"
    )


@rules.command()
@pod_spec_options
@target_options
def verify(target: Target, annotations_file: str | None, **settings: str | None) -> None:
    """Compare live rules with the spec; exit 0 when in place, 1 with a diff when they drifted."""
    spec = _parsed_spec(annotations_file, settings)
    _, drift = target.run(dataplane.verify, spec)
    click.echo(f"{drift.backend}: {drift.report}")
    raise SystemExit(0 if drift.in_place else 1)


@rules.command()
@target_options
def clean(target: Target) -> None:
    """Remove every rule and route of ours, and nothing else."""
    where, cleaned = target.run(dataplane.clean)
    click.echo(f"cleaned {where}: {', '.join(cleaned) or 'no rule tables present'}")


@rules.command("find-netns")
@click.option("--pod-uid", required=True, help="metadata.uid of the pod")
@click.option("--pod-ip", "pod_ips", multiple=True, help="an IP the pod's namespace must hold (repeatable)")
@click.option("--container-id", "container_ids", multiple=True, help="prefer this container's processes")
@click.option("--proc-root", default="/proc", show_default=True, help="the host's /proc")
def find_netns(
    pod_uid: str, pod_ips: tuple[str, ...], container_ids: tuple[str, ...], proc_root: str
) -> None:
    """Print the network namespace that discovery finds for a pod."""
    try:
        with find_pod_netns(pod_uid, container_ids, pod_ips, proc_root=proc_root) as found:
            click.echo(
                f"pod {found.pod_uid}: {found.netns.id} via pid {found.pid} "
                f"(container {found.container_id or 'unknown'}; "
                f"matched IPs: {', '.join(found.matched_ips) or 'none given'})"
            )
    except (ControllerError, ValueError) as exc:
        _fail(exc)
