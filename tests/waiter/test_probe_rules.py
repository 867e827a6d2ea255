"""The rules the waiter's probe depends on are in the plan: walk nat OUTPUT of `rules.plan.build` for the
exact connection each probe target makes and check it ends in a REDIRECT to the port the probe listens on.

Pure (no root): this is the contract between probeplan.py and rules/plan.py; the netns tests prove the
same with packets.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from istio_pod_network_controller.rules import model
from istio_pod_network_controller.rules.plan import build
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import build_spec
from istio_pod_network_controller.waiter.probeplan import Path, ProbeTarget, plan_probe

PROXY = 1337


@dataclass(frozen=True)
class Connection:
    """The first packet of a probe connection as nat OUTPUT sees it."""

    src: str
    dst: str
    dport: int
    oif: str
    uid: int
    gid: int


def _matches(match: model.Match, pkt: Connection) -> bool:
    if isinstance(match, model.Proto):
        return match.name == "tcp"
    if isinstance(match, model.DPort):
        return (pkt.dport == match.port) != match.negate
    if isinstance(match, model.DPorts):
        return (pkt.dport in match.ports) != match.negate
    if isinstance(match, model.Src):
        return (ipaddress.ip_address(pkt.src) in match.net) != match.negate
    if isinstance(match, model.Dst):
        return (ipaddress.ip_address(pkt.dst) in match.net) != match.negate
    if isinstance(match, model.OutIface):
        return pkt.oif == match.name
    if isinstance(match, model.UidOwner):
        return (pkt.uid == match.uid) != match.negate
    if isinstance(match, model.GidOwner):
        return (pkt.gid == match.gid) != match.negate
    return False  # InIface, CtState, SPort: never true for a new locally generated TCP connection


def _walk(chains: dict[str, model.Chain], rules: tuple[model.Rule, ...], pkt: Connection) -> int | None:
    """The REDIRECT port the packet ends at, or None when it returns through everything."""
    for rule in rules:
        if not all(_matches(m, pkt) for m in rule.matches):
            continue
        target = rule.target
        if isinstance(target, model.Return):
            return None
        if isinstance(target, model.Redirect):
            return target.port
        if isinstance(target, model.Jump) and target.chain in chains:
            port = _walk(chains, chains[target.chain].rules, pkt)
            if port is not None or target.chain != "ISTIO_OUTPUT_DNS":
                return port
    return None


def redirected_port(
    spec_annotations: dict[str, str],
    target: ProbeTarget,
    uid: int,
    gid: int,
    defaults: dict[str, str] | None = None,
) -> int | None:
    spec = build_spec(spec_annotations, defaults)
    family = build(spec.with_ipv6(target.family == 6)).family(target.family)  # type: ignore[arg-type]
    assert family is not None
    nat = family.table("nat")
    if nat is None:
        return None
    chains = {c.name: c for c in nat.chains}
    hooks = tuple(h.rule for h in nat.hooks if h.builtin == "OUTPUT")
    source = target.source or ("10.1.2.3" if target.family == 4 else "2001:db8:99::3")
    oif = "lo" if target.path is Path.LOOPBACK else "eth0"
    return _walk(chains, hooks, Connection(source, target.address, target.port, oif, uid, gid))


SHAPES = [
    {},
    {ann.INCLUDE_INBOUND_PORTS: ""},
    {ann.INCLUDE_OUTBOUND_IP_RANGES: ""},
    {ann.INCLUDE_INBOUND_PORTS: "", ann.INCLUDE_OUTBOUND_IP_RANGES: ""},
    {ann.INCLUDE_INBOUND_PORTS: "8080"},
    {ann.INTERCEPTION_MODE: "TPROXY"},
    {ann.INTERCEPTION_MODE: "TPROXY", ann.INCLUDE_INBOUND_PORTS: ""},
    {ann.EXCLUDE_OUTBOUND_PORTS: "15002"},
    {ann.CAPTURE_DNS: "true"},
    {ann.IPV6: "capture"},
    {ann.ENVOY_PORT: "15100"},
    {ann.ENVOY_USERID: "1338", ann.ENVOY_GROUPID: "1338"},
    {ann.ENVOY_USERID: "1338", ann.ENVOY_GROUPID: "1338", ann.INCLUDE_INBOUND_PORTS: ""},
    {ann.ENVOY_USERID: "1338", ann.ENVOY_GROUPID: "1338", ann.EXCLUDE_OUTBOUND_IP_RANGES: "192.0.2.0/24"},
    {ann.ENVOY_USERID: "1338", ann.ENVOY_GROUPID: "1338", ann.INCLUDE_OUTBOUND_IP_RANGES: "10.96.0.0/12"},
    {ann.ENVOY_USERID: "1338", ann.ENVOY_GROUPID: "1338", ann.INCLUDE_OUTBOUND_IP_RANGES: "",
     ann.INCLUDE_OUTBOUND_PORTS: "8443"},
]  # fmt: skip


@pytest.mark.parametrize(
    "pod", SHAPES, ids=lambda pod: ",".join(f"{k.rsplit('/')[-1]}={v}" for k, v in pod.items())
)
@pytest.mark.parametrize("waiter_ids", [(PROXY, PROXY), (1000, 1000)])
def test_every_probe_rides_a_rule_of_the_plan(pod: dict[str, str], waiter_ids: tuple[int, int]) -> None:
    uid, gid = waiter_ids
    plan = plan_probe(build_spec(pod), uid, gid, True)
    if not plan.targets:  # only another uid without outbound capture has no path at all
        assert uid != PROXY and not build_spec(pod).captures_outbound, plan.reason
    for target in plan.targets:
        if target.path is Path.BLOCKED:  # proven with packets in test_waiter_netns.py
            continue
        assert redirected_port(pod, target, uid, gid) == target.listen_port, target


@pytest.mark.parametrize("pod", SHAPES[:11])
def test_the_proxy_uid_always_has_a_probe(pod: dict[str, str]) -> None:
    """Every capturing shape is probed when the waiter runs as the proxy (as injection runs it)."""
    plan = plan_probe(build_spec(pod), PROXY, PROXY, False)
    assert plan.targets, plan.reason


def test_an_unredirected_probe_is_seen_as_such() -> None:
    """The walker itself can fail: with the proxy's gid, the other uid's outbound dial is returned."""
    target = ProbeTarget(4, Path.OUTBOUND, None, "192.0.2.1", 15002, 15001, 15006, 1)
    assert redirected_port({}, target, 1000, PROXY) is None
    assert redirected_port({}, target, 1000, 1000) == 15001
    loopback = ProbeTarget(4, Path.LOOPBACK, "127.0.0.1", "127.0.0.6", 15002, 15006, 15001)
    assert redirected_port({}, loopback, 1000, 1000) is None


GROUPS = [
    {"outbound_owner_groups": "1000"},
    {"outbound_owner_groups": "2000"},
    {"outbound_owner_groups_exclude": "1000"},
    {"outbound_owner_groups_exclude": "2000,1337"},
    {"outbound_owner_groups": "2000", "drop_invalid": "true"},
]


@pytest.mark.parametrize("defaults", GROUPS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("waiter_ids", [(PROXY, PROXY), (1000, 1000)])
def test_owner_groups_leave_a_probe_or_say_why(defaults: dict[str, str], waiter_ids: tuple[int, int]) -> None:
    """The proxy uid's loopback probe comes before the owner groups, so it always proves capture; another
    uid's outbound probe rides the rules exactly when its gid is captured, and is refused by name
    otherwise."""
    uid, gid = waiter_ids
    spec = build_spec({}, defaults)
    plan = plan_probe(spec, uid, gid, False)
    other_gid_captured = redirected_port(
        {}, ProbeTarget(4, Path.OUTBOUND, None, "192.0.2.1", 15002, 15001, 15006, 1), 1000, 1000, defaults
    )
    if uid == PROXY:
        assert plan.targets and plan.targets[0].path is Path.LOOPBACK, plan.reason
    elif other_gid_captured is None:
        assert not plan.targets
        assert "outbound owner groups leave gid 1000" in plan.reason
    else:
        assert plan.targets, plan.reason
    for target in plan.targets:
        if target.path is Path.BLOCKED:  # IPv6 blocked: proven with packets in test_waiter_netns.py
            continue
        assert redirected_port({}, target, uid, gid, defaults) == target.listen_port, target
