"""`istio-pod-network-controller rules render|apply|verify|clean|find-netns`: the data plane by hand."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..dataplane import apply as dataplane
from ..dataplane.discovery import find_pod_netns
from ..dataplane.netns import PinnedNetns
from ..downward import read_annotations
from ..errors import ControllerError
from ..rules import iptables, nftables, plan
from ..spec import SETTINGS, InterceptSpec, IPv6Policy, build_spec

F = TypeVar("F", bound=Callable[..., Any])

#: Setting name -> CLI flag, for the settings the CLI exposes (the 2018 --envoy-port included).
SPEC_FLAGS: dict[str, str] = {
    "interception_mode": "--interception-mode",
    "envoy_port": "--envoy-port",
    "outbound_port": "--outbound-port",
    "inbound_port": "--inbound-port",
    "proxy_uid": "--proxy-uid",
    "proxy_gid": "--proxy-gid",
    "include_inbound_ports": "--include-inbound-ports",
    "exclude_inbound_ports": "--exclude-inbound-ports",
    "include_outbound_ip_ranges": "--include-outbound-ip-ranges",
    "exclude_outbound_ip_ranges": "--exclude-outbound-ip-ranges",
    "include_outbound_ports": "--include-outbound-ports",
    "exclude_outbound_ports": "--exclude-outbound-ports",
    "exclude_interfaces": "--exclude-interfaces",
    "reroute_virtual_interfaces": "--reroute-virtual-interfaces",
    "capture_dns": "--capture-dns",
    "ipv6": "--ipv6",
}


def spec_options(func: F) -> F:
    """One string option per spec setting; values are validated by the spec's own parsers."""
    for setting in reversed(SETTINGS):
        flag = SPEC_FLAGS[setting.name]
        func = click.option(flag, setting.name, default=None, metavar="VALUE", help=setting.help)(func)
    return click.option(
        "--annotations",
        "annotations_file",
        type=click.Path(dir_okay=False),
        help='Pod annotations layered on top: a downward-API file (key="value" lines) or a JSON object.',
    )(func)


def target_options(func: F) -> F:
    func = click.option("--netns", "netns_path", metavar="PATH", help="/run/netns/NAME or /proc/PID/ns/net")(
        func
    )
    func = click.option("--pid", type=int, help="a process inside the target network namespace")(func)
    func = click.option(
        "--backend",
        type=click.Choice(dataplane.BACKEND_CHOICES),
        default="auto",
        show_default=True,
        help="auto keeps what the namespace already uses, else follows the node (legacy if it has legacy "
        "tables, else nft)",
    )(func)
    func = click.option("--proc-root", default="/proc", show_default=True, help="the host's /proc")(func)
    return click.option(
        "--allow-host-netns",
        is_flag=True,
        help="permit changing the node's own network namespace (dangerous)",
    )(func)


def _spec(annotations_file: str | None, settings: dict[str, str | None]) -> InterceptSpec:
    annotations = read_annotations(annotations_file) if annotations_file else {}
    defaults = {name: value for name, value in settings.items() if value is not None}
    return build_spec(annotations, defaults, default_source=lambda name: SPEC_FLAGS[name])


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    raise SystemExit(2)


@click.group()
def rules() -> None:
    """Render, apply, verify or remove the capture rules of one network namespace."""


@rules.command()
@spec_options
@click.option(
    "--format",
    "output",
    type=click.Choice(["iptables", "nftables", "json"]),
    default="iptables",
    show_default=True,
)
def render(annotations_file: str | None, output: str, **settings: str | None) -> None:
    """Print the rules a pod with these settings gets (IPv6 `auto` renders as `block` without addresses)."""
    try:
        spec = _spec(annotations_file, settings)
    except ControllerError as exc:
        _fail(exc)
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


def _open_target(netns_path: str | None, pid: int | None, proc_root: str) -> PinnedNetns:
    if netns_path is not None and pid is None:
        return PinnedNetns.open_path(netns_path)
    if pid is not None and netns_path is None:
        return PinnedNetns.open_pid(pid, proc_root)
    raise click.UsageError("give exactly one of --netns PATH or --pid PID")


def _backend(name: str) -> dataplane.BackendChoice:
    for choice in dataplane.BACKEND_CHOICES:
        if choice == name:
            return choice
    raise click.BadParameter(f"unknown backend {name!r}")


@rules.command()
@spec_options
@target_options
def apply(
    annotations_file: str | None,
    netns_path: str | None,
    pid: int | None,
    backend: str,
    proc_root: str,
    allow_host_netns: bool,
    **settings: str | None,
) -> None:
    """Install the rules (idempotent; replaces ours, leaves foreign rules alone)."""
    try:
        spec = _spec(annotations_file, settings)
        with _open_target(netns_path, pid, proc_root) as target:
            result = dataplane.apply(
                target,
                spec,
                _backend(backend),
                allow_host=allow_host_netns,
                proc_root=proc_root,
            )
    except ControllerError as exc:
        _fail(exc)
    ipv6 = "captured" if result.ipv6_captured else "blocked"
    click.echo(
        f"applied to {target.description} ({result.netns}) with {result.backend} "
        f"in {result.seconds * 1000:.1f} ms; IPv6 {ipv6}; spec {result.fingerprint}"
    )


@rules.command()
@spec_options
@target_options
def verify(
    annotations_file: str | None,
    netns_path: str | None,
    pid: int | None,
    backend: str,
    proc_root: str,
    allow_host_netns: bool,
    **settings: str | None,
) -> None:
    """Compare live rules with the spec; exit 0 when in place, 1 with a diff when they drifted."""
    try:
        spec = _spec(annotations_file, settings)
        with _open_target(netns_path, pid, proc_root) as target:
            drift = dataplane.verify(
                target,
                spec,
                _backend(backend),
                allow_host=allow_host_netns,
                proc_root=proc_root,
            )
    except ControllerError as exc:
        _fail(exc)
    click.echo(f"{drift.backend}: {drift.report}")
    raise SystemExit(0 if drift.in_place else 1)


@rules.command()
@target_options
def clean(
    netns_path: str | None, pid: int | None, backend: str, proc_root: str, allow_host_netns: bool
) -> None:
    """Remove every rule and route of ours, and nothing else."""
    try:
        with _open_target(netns_path, pid, proc_root) as target:
            cleaned = dataplane.clean(
                target,
                _backend(backend),
                allow_host=allow_host_netns,
                proc_root=proc_root,
            )
    except ControllerError as exc:
        _fail(exc)
    click.echo(f"cleaned {target.description}: {', '.join(cleaned) or 'no rule tables present'}")


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
