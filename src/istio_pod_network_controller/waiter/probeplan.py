"""Which probe proves capture for a pod's InterceptSpec, or why none can (pure: no sockets, no I/O).

Two paths, chosen by the uid and gid the waiter runs as (see docs/waiter.md, "What the probe proves"):
- LOOPBACK, the waiter is the proxy uid: dial 127.0.0.6 / ::6 from 127.0.0.1 / ::1. Only the rule
  `ISTIO_OUTPUT ! -d <loopback> -o lo -p tcp ! --dport 15008 -m owner --uid-owner <proxy>
  -j ISTIO_IN_REDIRECT` turns it into a connection to the inbound capture port. Istio keeps that rule in
  outbound-only mode too (`includeInboundPorts: ""`), so this path covers every shape that captures anything.
- OUTBOUND, the waiter is neither the proxy uid nor the proxy gid: its own connections are the app's, so
  the outbound capture sends a connection to a documentation (TEST-NET) address to the outbound capture
  port. Sent with TTL / hop limit 1: without the rules, a SYN dies at the pod's first hop. Outbound owner
  groups apply to it as to the app: a gid they leave out has no path (the loopback path comes before them).
Every intercepted spec gets ISTIO_OUTPUT with that rule, even with nothing included, so only
interceptionMode NONE needs no proof; a spec with no path is refused unless the operator trusts the
annotation (wait.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from ..settings.addresses import LOOPBACK, PASSTHROUGH, Family
from ..settings.spec import (
    HBONE_PORT,
    PROBE_PORT,
    WILDCARD,
    InterceptionMode,
    InterceptSpec,
    IPv6Policy,
)

TEST_NETS: Final = {
    4: ("192.0.2.1", "198.51.100.1", "203.0.113.1"),
    6: ("2001:db8::1", "2001:db8:1::1", "2001:db8:2::1"),
}
"""RFC 5737 / RFC 3849 documentation addresses: never a real peer, the outbound path's default target."""


class Path(StrEnum):
    LOOPBACK = "loopback"
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One family's probe: dial `address:port` (from `source`, or the kernel's choice) and expect the
    connection at `listen_port` on loopback with SO_ORIGINAL_DST `address:port`."""

    family: Family
    path: Path
    source: str | None
    address: str
    port: int
    listen_port: int
    other_port: int
    """The other capture port, listened on too, so a connection redirected to the wrong port is reported."""
    hop_limit: int | None = None


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """`targets` empty means no probe applies; `reason` then says why (for the log and timeout message)."""

    targets: tuple[ProbeTarget, ...]
    reason: str = ""
    tproxy: bool = False
    """TPROXY with inbound capture: also require the fwmark policy rule and local route (added last)."""
    captures: bool = True
    """False when the spec captures nothing: only then may the status annotation decide on its own."""

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(t.family for t in self.targets)


def probe_port(spec: InterceptSpec) -> int | None:
    """15002 unless the pod excludes it from outbound capture (the exclusion RETURNs before our rule)."""
    taken = {*spec.exclude_outbound_ports, HBONE_PORT, spec.inbound_port, spec.outbound_port}
    for port in range(PROBE_PORT, PROBE_PORT + 64):
        if port not in taken:
            return port
    return None


def probed_families(spec: InterceptSpec, global_ipv6: bool) -> tuple[Family, ...]:
    """IPv4 rules exist whenever the pod is intercepted; IPv6 ones with ipv6=capture, or with ipv6=auto
    when the pod has a global IPv6 address (the controller's own test)."""
    if spec.ipv6 is IPv6Policy.CAPTURE or (spec.ipv6 is IPv6Policy.AUTO and global_ipv6):
        return (4, 6)
    return (4,)


def outbound_target(spec: InterceptSpec, family: Family, port: int) -> tuple[str, int] | None:
    """(address, port) the pod's outbound capture sends to the proxy: a TEST-NET address or one inside
    an included range, on the probe port; or, with only includeOutboundPorts, a TEST-NET address on the
    first included port. Never inside an excluded range, never loopback."""
    excluded = [n for n in spec.exclude_outbound_ip_ranges if n.version == family]
    test_nets = [ipaddress.ip_address(a) for a in TEST_NETS[family]]
    if spec.include_outbound_ip_ranges == WILDCARD:
        candidates = test_nets
    else:
        candidates = [
            net.network_address + (1 if net.num_addresses > 2 else 0)
            for net in spec.include_outbound_ip_ranges
            if net.version == family
        ]
    if not candidates:
        kept = [p for p in spec.include_outbound_ports if p not in spec.exclude_outbound_ports]
        if not kept:
            return None
        candidates, port = test_nets, kept[0]
    for address in candidates:
        if address.is_loopback or address.is_multicast or address.is_unspecified:
            continue
        if not any(address in net for net in excluded):
            return str(address), port
    return None


def _group_captured(spec: InterceptSpec, gid: int) -> bool:
    """Whether the outbound owner groups capture traffic of `gid` (the socket's fsgid, as `--gid-owner`)."""
    if spec.outbound_owner_groups == WILDCARD:
        return gid not in spec.outbound_owner_groups_exclude
    return gid in spec.outbound_owner_groups


def plan_probe(spec: InterceptSpec, euid: int, egid: int, global_ipv6: bool) -> ProbePlan:
    """The probe for the waiter's effective uid/gid and whether the pod has a global IPv6 address."""
    if not spec.intercepts:
        reason = "interceptionMode is NONE: the controller installs no capture rules for this pod"
        return ProbePlan((), reason, captures=False)
    tproxy = spec.mode is InterceptionMode.TPROXY and spec.captures_inbound
    target = probe_port(spec)
    if target is None:
        return ProbePlan((), "every candidate probe port (15002-15065) is excluded from outbound capture")
    families = probed_families(spec, global_ipv6)
    if euid == spec.proxy_uid:
        if "lo" in spec.exclude_interfaces:
            return ProbePlan((), "excludeInterfaces contains lo: loopback traffic is never captured")
        targets = tuple(
            ProbeTarget(f, Path.LOOPBACK, LOOPBACK[f], PASSTHROUGH[f], target, spec.inbound_port,
                        spec.outbound_port)
            for f in families
        )  # fmt: skip
        return ProbePlan(targets, tproxy=tproxy)
    if egid == spec.proxy_gid:
        return ProbePlan(
            (),
            f"the waiter runs as uid {euid}, not the proxy uid {spec.proxy_uid}, but with the proxy gid "
            f"{egid}: the rules exempt its connections as the proxy's and return its loopback traffic, so "
            f"no capture rule applies to them (run the waiter with runAsUser: {spec.proxy_uid})",
        )
    if not spec.captures_outbound:
        return ProbePlan(
            (),
            f"the waiter runs as uid {euid}, not the proxy uid {spec.proxy_uid}, and outbound capture is "
            f"off: only the proxy uid's loopback traffic reaches a capture port (run the waiter with "
            f"runAsUser: {spec.proxy_uid})",
        )
    if not _group_captured(spec, egid):
        return ProbePlan(
            (),
            f"the waiter runs as uid {euid} and gid {egid}, and the outbound owner groups leave gid {egid}'s "
            f"traffic uncaptured: no capture rule applies to its connections (run the waiter with runAsUser: "
            f"{spec.proxy_uid}, or with a captured group)",
        )
    outbound = []
    for family in families:
        found = outbound_target(spec, family, target)
        if found is not None:
            address, port = found
            outbound.append(
                ProbeTarget(
                    family, Path.OUTBOUND, None, address, port, spec.outbound_port, spec.inbound_port, 1
                )
            )
    if not outbound or outbound[0].family != 4:
        return ProbePlan((), "no IPv4 destination is captured by the outbound rules for a probe to dial")
    return ProbePlan(tuple(outbound), tproxy=tproxy)
