"""Which probe proves capture for a pod's InterceptSpec, or why none can (pure: no sockets, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings.spec import HBONE_PORT, PROBE_PORT, InterceptionMode, InterceptSpec, IPv6Policy


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """`families` empty means no probe applies; `reason` then says why (for the log and timeout message)."""

    families: tuple[int, ...]
    inbound_port: int
    outbound_port: int
    target_port: int
    reason: str = ""
    tproxy: bool = False
    """TPROXY mode: also require the fwmark policy rule and local route the controller adds last."""


def probe_port(spec: InterceptSpec) -> int | None:
    """15002 unless the pod excludes it from outbound capture (the exclusion RETURNs before our rule)."""
    taken = {*spec.exclude_outbound_ports, HBONE_PORT, spec.inbound_port, spec.outbound_port}
    for port in range(PROBE_PORT, PROBE_PORT + 64):
        if port not in taken:
            return port
    return None


def plan_probe(spec: InterceptSpec, euid: int, global_ipv6: bool) -> ProbePlan:
    """The families to probe, given the waiter's effective uid and whether the pod has a global IPv6 address.

    The probe rides the rule `ISTIO_OUTPUT ! -d <loopback> -o lo -p tcp ! --dport 15008 -m owner
    --uid-owner <proxy uid> -j ISTIO_IN_REDIRECT`, which exists only with inbound capture on, and only for
    the proxy uid: the rule after it returns every other uid's loopback traffic before any gid rule is seen.
    IPv4 rules are installed whenever the pod is intercepted; IPv6 ones with ipv6=capture, or with ipv6=auto
    when the pod has a global IPv6 address (the controller's own test).
    """

    def none(reason: str) -> ProbePlan:
        return ProbePlan((), spec.inbound_port, spec.outbound_port, PROBE_PORT, reason)

    if spec.mode is InterceptionMode.NONE:
        return none("interceptionMode is NONE: the controller installs no capture rules for this pod")
    if not spec.captures_inbound:
        return none(
            "inbound capture is off (includeInboundPorts is empty): the only rule that brings the proxy's "
            "loopback traffic back to a listener is absent, and an outbound probe would have to leave the pod"
        )
    if euid != spec.proxy_uid:
        return none(
            f"the waiter runs as uid {euid}, not the proxy uid {spec.proxy_uid}: the capture rules return "
            f"loopback traffic of other uids untouched (run the waiter with runAsUser: {spec.proxy_uid})"
        )
    if "lo" in spec.exclude_interfaces:
        return none("excludeInterfaces contains lo: loopback traffic is never captured")
    target = probe_port(spec)
    if target is None:
        return none("every candidate probe port (15002-15065) is excluded from outbound capture")
    families: tuple[int, ...] = (4,)
    if spec.ipv6 is IPv6Policy.CAPTURE or (spec.ipv6 is IPv6Policy.AUTO and global_ipv6):
        families = (4, 6)
    tproxy = spec.mode is InterceptionMode.TPROXY
    return ProbePlan(families, spec.inbound_port, spec.outbound_port, target, tproxy=tproxy)
