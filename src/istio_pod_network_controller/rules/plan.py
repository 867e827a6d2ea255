"""Decide, once for every backend, which rules capture a pod's traffic as Istio's sidecar mode does.

The chains, rules and their order follow Istio's `istio-iptables` (docs/rules.md has the parity table), with
deliberate, packet-neutral differences: rules Istio puts in the built-in chains (interface exclusions, the
TPROXY connection-mark rules, KubeVirt's) live inside our chains, so we own everything we add; and a pod
whose IPv6 is not captured gets new IPv6 connections rejected both ways (loopback aside) instead of
silently bypassing the mesh.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ..settings.addresses import FAMILIES, LOOPBACK_NET, PASSTHROUGH_NET
from ..settings.spec import (
    DNS_CAPTURE_PORT,
    HBONE_PORT,
    TPROXY_MARK,
    TPROXY_ROUTE_TABLE,
    WILDCARD,
    InterceptionMode,
    InterceptSpec,
    IPAddress,
    IPNetwork,
    IPv6Policy,
)
from .model import (
    TABLE_ORDER,
    Accept,
    Chain,
    ChainName,
    ConnMark,
    CtState,
    CtZone,
    DPort,
    DPorts,
    Drop,
    Dst,
    Family,
    FamilyRules,
    GidOwner,
    Hook,
    InIface,
    Jump,
    Mark,
    Match,
    OutIface,
    PolicyRoute,
    Proto,
    Redirect,
    Reject,
    RestoreMark,
    Return,
    Rule,
    Ruleset,
    SaveMark,
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
"""Conntrack zone of the proxy's own queries to the DNS servers, and of their answers."""
DNS_ZONE_PROXY_REPLY = 2
"""Conntrack zone of the app's queries (redirected to the DNS proxy) and of the proxy's answers to them."""
OUTBOUND_MARK = 1338
"""TPROXY mode: the mark of the proxy's own loopback connections to the pod's addresses (Istio's 0x53a)."""
TPROXY_ROUTES: dict[Family, PolicyRoute] = {
    f: PolicyRoute(f, TPROXY_MARK, TPROXY_ROUTE_TABLE) for f in FAMILIES
}
"""The policy routes TPROXY needs per family; the data plane owns exactly these."""

TCP = Proto("tcp")
UDP = Proto("udp")
LO_IN = InIface("lo")
LO_OUT = OutIface("lo")


def rule(target: Target, *matches: Match) -> Rule:
    return Rule(tuple(matches), target)


def build(spec: InterceptSpec) -> Ruleset:
    """The whole ruleset for a pod; spec.ipv6 must be resolved (not AUTO), see InterceptSpec.with_ipv6."""
    if spec.ipv6 is IPv6Policy.AUTO:
        raise ValueError("resolve the IPv6 policy (InterceptSpec.with_ipv6) before building rules")
    if not spec.intercepts:
        return Ruleset((), ())
    capture_v6 = spec.ipv6 is IPv6Policy.CAPTURE
    families = [_capture(spec, 4), _capture(spec, 6) if capture_v6 else FamilyRules(6, (_block(),))]
    if spec.drop_invalid:
        families = [_with_drop_invalid(rules) for rules in families]
    routes: list[PolicyRoute] = []
    if spec.mode is InterceptionMode.TPROXY and spec.captures_inbound:
        routes = [TPROXY_ROUTES[f.family] for f in families if f.family == 4 or capture_v6]
    return Ruleset(tuple(families), tuple(routes))


def _with_drop_invalid(rules: FamilyRules) -> FamilyRules:
    """Istio's --drop-invalid: the first rule of mangle PREROUTING sends packets conntrack finds INVALID
    (out of window, unsolicited) to ISTIO_DROP, so the app's stack never answers them with a reset that
    would tear down a connection through the proxy. Both families, whatever the IPv6 policy."""
    hook = Hook("PREROUTING", rule(Jump(ChainName.DROP), CtState(("INVALID",))))
    chain = Chain(ChainName.DROP, (rule(Drop()),))
    mangle = rules.table("mangle") or TableRules("mangle", (), ())
    mangle = TableRules("mangle", (hook, *mangle.hooks), (chain, *mangle.chains))
    tables = [mangle, *(table for table in rules.tables if table.table != "mangle")]
    return FamilyRules(rules.family, tuple(sorted(tables, key=lambda table: TABLE_ORDER.index(table.table))))


def _of_family(nets: Iterable[IPNetwork], family: Family) -> list[IPNetwork]:
    return [net for net in nets if net.version == family]


def _dns_servers(spec: InterceptSpec, family: Family) -> list[IPAddress] | None:
    """The DNS servers captured in `family`: None for all of them, [] when DNS is not captured there."""
    if not spec.capture_dns:
        return []
    if spec.dns_capture_everywhere:
        return None
    return [server for server in spec.dns_servers or () if server.version == family]


def _host(address: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(address)


def _capture(spec: InterceptSpec, family: Family) -> FamilyRules:
    tables: list[TableRules] = []
    servers = _dns_servers(spec, family)
    if servers is None or servers:
        tables.append(_dns_zones(spec, servers))
    tproxy = spec.mode is InterceptionMode.TPROXY
    if tproxy and spec.captures_inbound:
        tables.append(_tproxy_mangle(spec, family))
    tables.append(_nat(spec, family, servers, inbound_in_nat=not tproxy))
    return FamilyRules(family, tuple(tables))


def _interface_exclusions(spec: InterceptSpec) -> list[Rule]:
    return [rule(Return(), InIface(name)) for name in spec.exclude_interfaces]


def _inbound_excluded(spec: InterceptSpec, *, hbone: bool) -> list[int]:
    """Ports returned before the `*` catch-all: the user's and the proxy's own (plus 15008 in REDIRECT)."""
    ports = dict.fromkeys((*spec.inbound_always_excluded, *spec.exclude_inbound_ports))
    ports.pop(HBONE_PORT, None)
    return [HBONE_PORT, *ports] if hbone else list(ports)


def _redirect_inbound(spec: InterceptSpec) -> list[Rule]:
    """REDIRECT mode's inbound selection: 15008 returned; `*` minus exclusions, or an explicit list."""
    capture = Jump(ChainName.IN_REDIRECT)
    if spec.include_inbound_ports == WILDCARD:
        returns = [rule(Return(), TCP, DPort(port)) for port in _inbound_excluded(spec, hbone=True)]
        return [*returns, rule(capture, TCP)]
    hbone = rule(Return(), TCP, DPort(HBONE_PORT))
    return [hbone, *(rule(capture, TCP, DPort(port)) for port in spec.include_inbound_ports)]


def _tproxy_inbound(spec: InterceptSpec) -> list[Rule]:
    """TPROXY mode's inbound selection, as Istio's: no 15008 exemption; packets of known connections to
    ISTIO_DIVERT (TPROXY would drop them on finding a non-transparent socket), new ones to ISTIO_TPROXY."""
    divert, tproxy = Jump(ChainName.DIVERT), Jump(ChainName.TPROXY)
    known = CtState(("RELATED", "ESTABLISHED"))
    if spec.include_inbound_ports == WILDCARD:
        returns = [rule(Return(), TCP, DPort(port)) for port in _inbound_excluded(spec, hbone=False)]
        return [*returns, rule(divert, TCP, known), rule(tproxy, TCP)]
    rules: list[Rule] = []
    for port in spec.include_inbound_ports:
        rules += [rule(divert, TCP, DPort(port), known), rule(tproxy, TCP, DPort(port))]
    return rules


def _tproxy_mangle(spec: InterceptSpec, family: Family) -> TableRules:
    """Inbound TPROXY with Istio's original-source support.

    Envoy's original_src listener filter connects to the app from the client's own address with mark 1337;
    that mark is saved on the connection when the packet loops back in, restored on the app's replies in
    OUTPUT, and the mark-1337 policy route then delivers those replies locally, to Envoy, instead of out to
    the client. Loopback traffic is returned except the proxy's own calls to the pod's addresses (1338).
    """
    own_mark = Mark(TPROXY_MARK)
    inbound = [
        *_interface_exclusions(spec),
        rule(SaveMark(), TCP, own_mark),  # Istio: mangle PREROUTING, after the jump; same packets
        rule(Return(), TCP, own_mark),
        rule(Return(), TCP, Src(PASSTHROUGH_NET[family]), LO_IN),
        rule(Return(), TCP, LO_IN, Mark(OUTBOUND_MARK, negate=True)),
        *_tproxy_inbound(spec),
    ]
    not_loopback = Dst(LOOPBACK_NET[family], negate=True)
    marks = [
        *(rule(Return(), OutIface(name)) for name in spec.exclude_interfaces),
        rule(Return(), TCP, LO_OUT, own_mark),
        rule(SetMark(OUTBOUND_MARK), not_loopback, TCP, LO_OUT, UidOwner(spec.proxy_uid)),
        rule(SetMark(OUTBOUND_MARK), not_loopback, TCP, LO_OUT, GidOwner(spec.proxy_gid)),
        rule(RestoreMark(), TCP, ConnMark(TPROXY_MARK)),
    ]
    return TableRules(
        "mangle",
        (
            Hook("PREROUTING", rule(Jump(ChainName.INBOUND), TCP)),
            Hook("OUTPUT", rule(Jump(ChainName.OUTPUT_MARK), TCP)),
        ),
        (
            Chain(ChainName.DIVERT, (rule(SetMark(TPROXY_MARK)), rule(Accept()))),
            Chain(ChainName.INBOUND, tuple(inbound)),
            Chain(ChainName.TPROXY, (rule(Tproxy(spec.inbound_port, TPROXY_MARK), not_loopback, TCP),)),
            Chain(ChainName.OUTPUT_MARK, tuple(marks)),
        ),
    )


def _included_ranges(spec: InterceptSpec, family: Family) -> list[IPNetwork] | None:
    """None for `*`, else the included ranges of this family."""
    if spec.include_outbound_ip_ranges == WILDCARD:
        return None
    return _of_family(spec.include_outbound_ip_ranges, family)


def _nat(
    spec: InterceptSpec, family: Family, dns: list[IPAddress] | None, *, inbound_in_nat: bool
) -> TableRules:
    redirect = Jump(ChainName.REDIRECT)
    ranges = _included_ranges(spec, family)
    inbound: list[Rule] = []
    for name in spec.reroute_virtual_interfaces:
        # KubeVirt: the VM's traffic comes in on the interface; what goes to the included ranges is
        # outbound traffic, the rest passes (never inbound capture).
        vm = InIface(name)
        targets = [rule(redirect, vm)] if ranges is None else [rule(redirect, vm, Dst(net)) for net in ranges]
        inbound += [*targets, rule(Return(), vm)]
    if inbound_in_nat and spec.captures_inbound:
        inbound += _redirect_inbound(spec)
    hooks: list[Hook] = []
    chains: list[Chain] = []
    if inbound:
        hooks.append(Hook("PREROUTING", rule(Jump(ChainName.INBOUND), TCP)))
        chains.append(Chain(ChainName.INBOUND, (*_interface_exclusions(spec), *inbound)))
    # ISTIO_IN_REDIRECT and ISTIO_OUTPUT exist in every capturing mode, outbound-only included: the proxy's
    # own calls to its pod's addresses still go to the inbound listener (the waiter's outbound-only probe).
    chains.append(Chain(ChainName.IN_REDIRECT, (rule(Redirect(spec.inbound_port), TCP),)))
    hooks.append(Hook("OUTPUT", rule(Jump(ChainName.OUTPUT))))
    chains.append(Chain(ChainName.OUTPUT, tuple(_output(spec, family, dns, ranges))))
    if dns is None or dns:
        chains.append(Chain(ChainName.OUTPUT_DNS, tuple(_dns_redirect(dns))))
    if spec.captures_outbound:
        chains.append(Chain(ChainName.REDIRECT, (rule(Redirect(spec.outbound_port), TCP),)))
    return TableRules("nat", tuple(hooks), tuple(chains))


def _output(
    spec: InterceptSpec, family: Family, dns: list[IPAddress] | None, ranges: list[IPNetwork] | None
) -> list[Rule]:
    """Istio's ISTIO_OUTPUT, rule for rule (interface exclusions moved in from the built-in chain).

    As in Istio, the DNS forms of the loopback rules follow DNS capture as a whole (any family), the jump
    to ISTIO_OUTPUT_DNS only a family that has nameservers to capture.
    """
    capture_dns = spec.capture_dns and (spec.dns_capture_everywhere or bool(spec.dns_servers))
    jump_dns = dns is None or bool(dns)
    loopback = LOOPBACK_NET[family]
    rules = [rule(Return(), OutIface(name)) for name in spec.exclude_interfaces]
    for port in spec.exclude_outbound_ports:
        rules += [rule(Return(), TCP, DPort(port)), rule(Return(), UDP, DPort(port))]
    rules.append(rule(Return(), LO_OUT, Src(PASSTHROUGH_NET[family])))
    # An include list holding a loopback range means "capture loopback": Istio then keeps lo traffic.
    loopback_included = any(net.is_loopback for net in _all_included(spec))
    for owner, other in (
        (UidOwner(spec.proxy_uid), UidOwner(spec.proxy_uid, negate=True)),
        (GidOwner(spec.proxy_gid), GidOwner(spec.proxy_gid, negate=True)),
    ):
        # The proxy calling the pod's own addresses over lo (the app calling itself through a Service VIP,
        # Envoy's outbound leg) comes back in as inbound. With DNS capture, Istio spares the uid's TCP 53
        # here (the agent's own DNS), and keeps app TCP 53 over lo for the DNS chain below.
        spared: Match = DPort(HBONE_PORT, negate=True)
        if capture_dns and isinstance(owner, UidOwner):
            spared = DPorts((DNS_PORT, HBONE_PORT), negate=True)
        rules.append(
            rule(Jump(ChainName.IN_REDIRECT), LO_OUT, Dst(loopback, negate=True), TCP, spared, owner)
        )
        if not loopback_included:
            if capture_dns:
                rules.append(rule(Return(), LO_OUT, TCP, DPort(DNS_PORT, negate=True), other))
            else:
                rules.append(rule(Return(), LO_OUT, other))
        rules.append(rule(Return(), owner))
    rules += _owner_groups(spec)
    if jump_dns:
        rules.append(rule(Jump(ChainName.OUTPUT_DNS)))
    rules.append(rule(Return(), Dst(loopback)))
    rules += [rule(Return(), Dst(net)) for net in _of_family(spec.exclude_outbound_ip_ranges, family)]
    if spec.captures_outbound:
        redirect = Jump(ChainName.REDIRECT)
        rules += [rule(redirect, TCP, DPort(port)) for port in spec.include_outbound_ports]
        targets = [rule(redirect)] if ranges is None else [rule(redirect, Dst(net)) for net in ranges]
        rules += targets
    return rules


def _owner_groups(spec: InterceptSpec) -> list[Rule]:
    """Istio's outbound owner groups, after the proxy's exemptions and before DNS and every capture: a list
    returns the traffic of every other group in one rule; with `*`, each excluded group is returned (the
    exclusions apply to `*` only, as in Istio)."""
    if spec.outbound_owner_groups == WILDCARD:
        return [rule(Return(), GidOwner(gid)) for gid in spec.outbound_owner_groups_exclude]
    return [rule(Return(), *(GidOwner(gid, negate=True) for gid in spec.outbound_owner_groups))]


def _all_included(spec: InterceptSpec) -> tuple[IPNetwork, ...]:
    return () if spec.include_outbound_ip_ranges == WILDCARD else spec.include_outbound_ip_ranges


def _dns_redirect(servers: list[IPAddress] | None) -> list[Rule]:
    """DNS to the capture port, TCP then UDP: every server (capture-all) or the pod's nameservers only, so
    a local resolver's own upstream queries (dnsmasq and the like) never loop back to the proxy."""
    to_proxy = Redirect(DNS_CAPTURE_PORT)
    if servers is None:
        return [rule(to_proxy, proto, DPort(DNS_PORT)) for proto in (TCP, UDP)]
    return [rule(to_proxy, proto, DPort(DNS_PORT), Dst(_host(s))) for proto in (TCP, UDP) for s in servers]


def _dns_zones(spec: InterceptSpec, servers: list[IPAddress] | None) -> TableRules:
    """Conntrack zones keep the proxy's upstream DNS flows (zone 1) apart from the app's flows that the
    proxy answers (zone 2), so each UDP answer finds its own flow and its NAT is undone."""
    outbound: list[Rule] = []
    for owner in (UidOwner(spec.proxy_uid), GidOwner(spec.proxy_gid)):
        outbound.append(rule(CtZone(DNS_ZONE_UPSTREAM), UDP, DPort(DNS_PORT), owner))
        outbound.append(rule(CtZone(DNS_ZONE_PROXY_REPLY), UDP, SPort(DNS_CAPTURE_PORT), owner))
    if servers is None:
        outbound.append(rule(CtZone(DNS_ZONE_PROXY_REPLY), UDP, DPort(DNS_PORT)))
        inbound = [rule(CtZone(DNS_ZONE_UPSTREAM), UDP, SPort(DNS_PORT))]
    else:
        outbound += [rule(CtZone(DNS_ZONE_PROXY_REPLY), UDP, DPort(DNS_PORT), Dst(_host(s))) for s in servers]
        inbound = [rule(CtZone(DNS_ZONE_UPSTREAM), UDP, SPort(DNS_PORT), Src(_host(s))) for s in servers]
    return TableRules(
        "raw",
        (
            Hook("PREROUTING", rule(Jump(ChainName.INBOUND_DNS))),
            Hook("OUTPUT", rule(Jump(ChainName.OUTPUT_DNS))),
        ),
        (Chain(ChainName.INBOUND_DNS, tuple(inbound)), Chain(ChainName.OUTPUT_DNS, tuple(outbound))),
    )


def _block() -> TableRules:
    """IPv6 not captured: refuse new IPv6 TCP and UDP connections both ways, loopback aside, so neither a
    client nor the app (nor the proxy: IPv6 is not this pod's mesh) goes around the capture.

    Outbound TCP gets a reset (ECONNREFUSED at once); an outbound UDP datagram is refused before it leaves,
    so the sender's send() fails with EPERM: the waiter's proof that the block is in place (no peer can
    cause that errno; without the rule the datagram just leaves).
    Established flows (replies, our own inbound resets) and ICMPv6 (neighbour discovery) pass, as in IPv4,
    where Istio captures neither.
    """
    new = CtState(("NEW",))
    return TableRules(
        "filter",
        (
            Hook("INPUT", rule(Jump(ChainName.BLOCK_INBOUND))),
            Hook("OUTPUT", rule(Jump(ChainName.BLOCK_OUTBOUND))),
        ),
        (
            Chain(
                ChainName.BLOCK_INBOUND,
                (
                    rule(Return(), LO_IN),
                    rule(Reject("tcp-reset"), TCP, new),
                    rule(Reject("port-unreachable"), UDP, new),
                ),
            ),
            Chain(
                ChainName.BLOCK_OUTBOUND,
                (
                    rule(Return(), LO_OUT),
                    rule(Reject("tcp-reset"), TCP, new),
                    rule(Reject("admin-prohibited"), UDP, new),
                ),
            ),
        ),
    )
