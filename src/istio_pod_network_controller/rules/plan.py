"""Decide, once for every backend, which rules capture a pod's traffic as Istio's sidecar mode does.

The chain layout and rule order follow Istio's `istio-iptables` (see docs/rules.md for the per-rule why), with
two deliberate differences: interface exclusions live inside our chains instead of the built-in ones (so we
own everything we add), and a pod whose IPv6 is not captured gets new inbound IPv6 rejected instead of
silently bypassing the mesh.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ..settings.spec import (
    ALWAYS_EXCLUDED_INBOUND,
    DNS_CAPTURE_PORT,
    HBONE_PORT,
    TPROXY_MARK,
    TPROXY_ROUTE_TABLE,
    WILDCARD,
    InterceptionMode,
    InterceptSpec,
    IPNetwork,
    IPv6Policy,
)
from .model import (
    Accept,
    Chain,
    CtState,
    CtZone,
    DPort,
    Dst,
    Family,
    FamilyRules,
    GidOwner,
    Hook,
    InIface,
    Jump,
    Match,
    OutIface,
    PolicyRoute,
    Proto,
    Redirect,
    Reject,
    Return,
    Rule,
    Ruleset,
    SetMark,
    SPort,
    Src,
    TableRules,
    Target,
    Tproxy,
    UidOwner,
)

DNS_PORT = 53
DNS_ZONE_UPSTREAM = 1
DNS_ZONE_PROXY_REPLY = 2

_LOOPBACK = {4: ipaddress.ip_network("127.0.0.1/32"), 6: ipaddress.ip_network("::1/128")}
_PASSTHROUGH = {4: ipaddress.ip_network("127.0.0.6/32"), 6: ipaddress.ip_network("::6/128")}
TCP = Proto("tcp")
UDP = Proto("udp")


def rule(target: Target, *matches: Match) -> Rule:
    return Rule(tuple(matches), target)


def build(spec: InterceptSpec) -> Ruleset:
    """The whole ruleset for a pod; spec.ipv6 must be resolved (not AUTO), see InterceptSpec.with_ipv6."""
    if spec.ipv6 is IPv6Policy.AUTO:
        raise ValueError("resolve the IPv6 policy (InterceptSpec.with_ipv6) before building rules")
    if not spec.intercepts:
        return Ruleset((), ())
    families: list[FamilyRules] = [_capture(spec, 4)]
    routes: list[PolicyRoute] = []
    capture_v6 = spec.ipv6 is IPv6Policy.CAPTURE
    if capture_v6:
        families.append(_capture(spec, 6))
    else:
        families.append(FamilyRules(6, (_block_inbound(),)))
    if spec.mode is InterceptionMode.TPROXY and spec.captures_inbound:
        routes.append(PolicyRoute(4, TPROXY_MARK, TPROXY_ROUTE_TABLE))
        if capture_v6:
            routes.append(PolicyRoute(6, TPROXY_MARK, TPROXY_ROUTE_TABLE))
    return Ruleset(tuple(families), tuple(routes))


def _of_family(nets: Iterable[IPNetwork], family: Family) -> list[IPNetwork]:
    return [net for net in nets if net.version == family]


def _capture(spec: InterceptSpec, family: Family) -> FamilyRules:
    tables: list[TableRules] = []
    if spec.capture_dns:
        tables.append(_dns_zones(spec))
    tproxy = spec.mode is InterceptionMode.TPROXY
    if tproxy and spec.captures_inbound:
        tables.append(_tproxy_inbound(spec, family))
    nat = _nat(spec, family, inbound_in_nat=not tproxy)
    if nat.chains:
        tables.append(nat)
    return FamilyRules(family, tuple(tables))


def _interface_exclusions(spec: InterceptSpec) -> list[Rule]:
    return [rule(Return(), InIface(name)) for name in spec.exclude_interfaces]


def _inbound_port_rules(spec: InterceptSpec, capture: Target) -> list[Rule]:
    """Istio's inbound selection: 15008 always returned; `*` minus exclusions, or an explicit list."""
    rules = [rule(Return(), TCP, DPort(HBONE_PORT))]
    if spec.include_inbound_ports == WILDCARD:
        excluded = dict.fromkeys((*ALWAYS_EXCLUDED_INBOUND, *spec.exclude_inbound_ports))
        excluded.pop(HBONE_PORT, None)
        rules += [rule(Return(), TCP, DPort(port)) for port in excluded]
        rules.append(rule(capture, TCP))
    else:
        rules += [rule(capture, TCP, DPort(port)) for port in spec.include_inbound_ports]
    return rules


def _tproxy_inbound(spec: InterceptSpec, family: Family) -> TableRules:
    # Loopback-routed traffic is left to the nat OUTPUT rules, as in REDIRECT mode; packets of connections
    # conntrack already knows (replies to the pod's own outbound calls, TPROXY'd inbound) skip TPROXY, whose
    # kernel target would otherwise drop them on finding a non-transparent socket.
    inbound = [
        *_interface_exclusions(spec),
        rule(Return(), InIface("lo")),
        rule(Jump("ISTIO_DIVERT"), TCP, CtState(("RELATED", "ESTABLISHED"))),
        *_inbound_port_rules(spec, Jump("ISTIO_TPROXY")),
    ]
    return TableRules(
        "mangle",
        (Hook("PREROUTING", rule(Jump("ISTIO_INBOUND"), TCP)),),
        (
            Chain("ISTIO_DIVERT", (rule(SetMark(TPROXY_MARK)), rule(Accept()))),
            Chain("ISTIO_INBOUND", tuple(inbound)),
            Chain(
                "ISTIO_TPROXY",
                (rule(Tproxy(spec.inbound_port, TPROXY_MARK), Dst(_LOOPBACK[family], negate=True), TCP),),
            ),
        ),
    )


def _outbound_targets(spec: InterceptSpec, family: Family, *prefix: Match) -> list[Rule]:
    """Where outbound traffic is sent to the proxy: included ports, then `*` or the included ranges."""
    redirect = Jump("ISTIO_REDIRECT")
    rules = [rule(redirect, *prefix, TCP, DPort(port)) for port in spec.include_outbound_ports]
    if spec.include_outbound_ip_ranges == WILDCARD:
        rules.append(rule(redirect, *prefix))
    else:
        ranges = _of_family(spec.include_outbound_ip_ranges, family)
        rules += [rule(redirect, *prefix, Dst(net)) for net in ranges]
    return rules


def _nat(spec: InterceptSpec, family: Family, *, inbound_in_nat: bool) -> TableRules:
    chains: list[Chain] = []
    hooks: list[Hook] = []
    inbound: list[Rule] = []
    for name in spec.reroute_virtual_interfaces:
        inbound += _outbound_targets(spec, family, InIface(name))
    if inbound_in_nat and spec.captures_inbound:
        inbound += _inbound_port_rules(spec, Jump("ISTIO_IN_REDIRECT"))
    if inbound:
        hooks.append(Hook("PREROUTING", rule(Jump("ISTIO_INBOUND"), TCP)))
        chains.append(Chain("ISTIO_INBOUND", (*_interface_exclusions(spec), *inbound)))
    # ISTIO_IN_REDIRECT exists in every capturing mode, outbound-only included: the proxy's own calls to
    # its pod's addresses still go to the inbound listener (and the waiter's outbound-only probe uses it).
    chains.append(Chain("ISTIO_IN_REDIRECT", (rule(Redirect(spec.inbound_port), TCP),)))
    if spec.capture_dns:
        hooks.append(Hook("OUTPUT", rule(Jump("ISTIO_OUTPUT_DNS"))))
        chains.append(Chain("ISTIO_OUTPUT_DNS", tuple(_dns_redirect(spec))))
    hooks.append(Hook("OUTPUT", rule(Jump("ISTIO_OUTPUT"))))
    chains.append(Chain("ISTIO_OUTPUT", tuple(_output(spec, family))))
    if spec.captures_outbound:
        chains.append(Chain("ISTIO_REDIRECT", (rule(Redirect(spec.outbound_port), TCP),)))
    return TableRules("nat", tuple(hooks), tuple(chains))


def _output(spec: InterceptSpec, family: Family) -> list[Rule]:
    lo = OutIface("lo")
    loopback = _LOOPBACK[family]
    rules = [rule(Return(), OutIface(name)) for name in spec.exclude_interfaces]
    rules += [rule(Return(), TCP, DPort(port)) for port in spec.exclude_outbound_ports]
    rules.append(rule(Return(), Src(_PASSTHROUGH[family]), lo))
    owners: tuple[type[UidOwner] | type[GidOwner], int] = (UidOwner, spec.proxy_uid)
    for owner_type, owner_id in (owners, (GidOwner, spec.proxy_gid)):
        # The app calling itself through a Service VIP: Envoy's outbound leg comes back in as inbound.
        # Istio keeps this rule with inbound capture off too (includeInboundPorts=""), so it does here.
        rules.append(
            rule(
                Jump("ISTIO_IN_REDIRECT"),
                Dst(loopback, negate=True),
                lo,
                TCP,
                DPort(HBONE_PORT, negate=True),
                owner_type(owner_id),
            )
        )
        rules.append(rule(Return(), lo, owner_type(owner_id, negate=True)))
        rules.append(rule(Return(), owner_type(owner_id)))
    rules.append(rule(Return(), Dst(loopback)))
    if spec.captures_outbound:
        rules += [rule(Return(), Dst(net)) for net in _of_family(spec.exclude_outbound_ip_ranges, family)]
        rules += _outbound_targets(spec, family)
    return rules


def _dns_redirect(spec: InterceptSpec) -> list[Rule]:
    rules = [rule(Return(), OutIface(name)) for name in spec.exclude_interfaces]
    for proto in (UDP, TCP):
        rules.append(rule(Return(), proto, DPort(DNS_PORT), UidOwner(spec.proxy_uid)))
        rules.append(rule(Return(), proto, DPort(DNS_PORT), GidOwner(spec.proxy_gid)))
        rules.append(rule(Redirect(DNS_CAPTURE_PORT), proto, DPort(DNS_PORT)))
    return rules


def _dns_zones(spec: InterceptSpec) -> TableRules:
    """Conntrack zones keep the proxy's upstream DNS flows apart from the app's flows it answers."""
    outbound = []
    for owner in (UidOwner(spec.proxy_uid), GidOwner(spec.proxy_gid)):
        outbound.append(rule(CtZone(DNS_ZONE_UPSTREAM), UDP, DPort(DNS_PORT), owner))
        outbound.append(rule(CtZone(DNS_ZONE_PROXY_REPLY), UDP, SPort(DNS_CAPTURE_PORT), owner))
    return TableRules(
        "raw",
        (
            Hook("PREROUTING", rule(Jump("ISTIO_INBOUND_DNS"), UDP)),
            Hook("OUTPUT", rule(Jump("ISTIO_OUTPUT_DNS"), UDP)),
        ),
        (
            Chain("ISTIO_INBOUND_DNS", (rule(CtZone(DNS_ZONE_UPSTREAM), UDP, SPort(DNS_PORT)),)),
            Chain("ISTIO_OUTPUT_DNS", tuple(outbound)),
        ),
    )


def _block_inbound() -> TableRules:
    """IPv6 not captured: refuse new inbound IPv6 connections so they cannot bypass the proxy."""
    return TableRules(
        "filter",
        (Hook("INPUT", rule(Jump("ISTIO_BLOCK_INBOUND"))),),
        (
            Chain(
                "ISTIO_BLOCK_INBOUND",
                (
                    rule(Return(), InIface("lo")),
                    rule(Reject("tcp-reset"), TCP, CtState(("NEW",))),
                    rule(Reject("port-unreachable"), UDP, CtState(("NEW",))),
                ),
            ),
        ),
    )
