"""Pure rendering: the reference rule set, golden files per configuration, and the apply transactions.

Regenerate goldens after an intended change with `UPDATE_GOLDEN=1 make pytest` and review the diff.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from istio_pod_network_controller.rules import iptables, nftables, plan
from istio_pod_network_controller.rules.model import (
    ChainName,
    ConnMark,
    CtState,
    CtZone,
    DPort,
    DPorts,
    Dst,
    Family,
    FamilyRules,
    GidOwner,
    InIface,
    Jump,
    Mark,
    Match,
    OutIface,
    Proto,
    Redirect,
    RestoreMark,
    Return,
    SaveMark,
    SetMark,
    SPort,
    Src,
    TableRules,
    Target,
    UidOwner,
)
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.addresses import LOOPBACK, PASSTHROUGH
from istio_pod_network_controller.settings.spec import PROBE_PORT, InterceptSpec, IPv6Policy, build_spec

GOLDEN = Path(__file__).parent / "golden"

# Istio's default sidecar REDIRECT rule set (istio-iptables, includeInboundPorts=*; excludeInboundPorts
# 15020,15021,15090 as Istio's injector passes them), in the word order of current istio-iptables.
ISTIO_DEFAULT_NAT = """\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""

CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "inbound-list": {ann.INCLUDE_INBOUND_PORTS: "80,8080", ann.EXCLUDE_INBOUND_PORTS: "22"},
    "inbound-excludes": {ann.EXCLUDE_INBOUND_PORTS: "22,15021"},
    "no-inbound": {ann.INCLUDE_INBOUND_PORTS: ""},
    "no-outbound": {ann.INCLUDE_OUTBOUND_IP_RANGES: ""},
    "outbound-ranges": {
        ann.INCLUDE_OUTBOUND_IP_RANGES: "10.96.0.0/12,fd00:96::/108",
        ann.EXCLUDE_OUTBOUND_IP_RANGES: "10.96.0.1/32",
    },
    "outbound-ports": {
        ann.INCLUDE_OUTBOUND_IP_RANGES: "",
        ann.INCLUDE_OUTBOUND_PORTS: "443,8443",
        ann.EXCLUDE_OUTBOUND_PORTS: "5432",
    },
    "exclusions": {
        ann.EXCLUDE_OUTBOUND_IP_RANGES: "169.254.169.254/32,fd00:ec2::254/128",
        ann.EXCLUDE_OUTBOUND_PORTS: "3306,5432",
        ann.EXCLUDE_INTERFACES: "net1",
    },
    "reroute-virtual": {ann.REROUTE_VIRTUAL_INTERFACES: "k6t-eth0,tap0"},
    "tproxy": {ann.INTERCEPTION_MODE: "TPROXY"},
    "dns": {ann.CAPTURE_DNS: "true"},
    "legacy-2018": {ann.ENVOY_PORT: "15001", ann.ENVOY_USERID: "1000", ann.ENVOY_GROUPID: "1000"},
    "ipv6-capture": {ann.IPV6: "capture", ann.EXCLUDE_OUTBOUND_IP_RANGES: "fd00::/8"},
    "tproxy-dns-ipv6": {ann.INTERCEPTION_MODE: "TPROXY", ann.CAPTURE_DNS: "true", ann.IPV6: "capture"},
    "tproxy-inbound-list": {ann.INTERCEPTION_MODE: "TPROXY", ann.INCLUDE_INBOUND_PORTS: "8080,9090"},
    "tproxy-no-inbound": {ann.INTERCEPTION_MODE: "TPROXY", ann.INCLUDE_INBOUND_PORTS: ""},
    "dns-servers": {ann.CAPTURE_DNS: "true", ann.IPV6: "capture"},
    "dns-servers-v4-only": {ann.CAPTURE_DNS: "true", ann.IPV6: "capture"},
    "dns-capture-all": {ann.CAPTURE_DNS: "true"},
    "dns-excluded-port": {ann.CAPTURE_DNS: "true", ann.EXCLUDE_OUTBOUND_PORTS: "53"},
    "dns-no-servers": {ann.CAPTURE_DNS: "true"},
    "kubevirt-ranges": {
        ann.KUBEVIRT_INTERFACES: "vnet0,vnet1",
        ann.INCLUDE_OUTBOUND_IP_RANGES: "10.96.0.0/12,fd00:96::/108",
        ann.IPV6: "capture",
    },
    "loopback-included": {ann.INCLUDE_OUTBOUND_IP_RANGES: "127.0.0.0/8,10.96.0.0/12"},
    "drop-invalid": {},
    "tproxy-drop-invalid": {ann.INTERCEPTION_MODE: "TPROXY", ann.IPV6: "capture"},
    "owner-groups": {ann.CAPTURE_DNS: "true", ann.IPV6: "capture"},
    "owner-groups-exclude": {ann.INCLUDE_OUTBOUND_IP_RANGES: "10.96.0.0/12"},
}
DEFAULTS: dict[str, dict[str, str]] = {
    "dns-capture-all": {"capture_all_dns": "true"},
    "drop-invalid": {"drop_invalid": "true"},
    "tproxy-drop-invalid": {"drop_invalid": "true"},
    "owner-groups": {"outbound_owner_groups": "202,1000", "outbound_owner_groups_exclude": "888"},
    "owner-groups-exclude": {"outbound_owner_groups_exclude": "888,0"},
}
"""Controller-wide settings (flags) of a configuration, beside its annotations."""
NAMESERVERS: dict[str, tuple[str, ...]] = {
    "dns-servers": ("10.96.0.10", "fd00:96::a"),
    "dns-servers-v4-only": ("10.96.0.10",),
    "dns-capture-all": ("10.96.0.10",),
    "dns-excluded-port": ("10.96.0.10",),
    "dns-no-servers": (),
}
"""The pod's resolv.conf nameservers, as the data plane finds them at apply time."""


def _spec(name: str) -> InterceptSpec:
    spec = build_spec(CONFIGS[name], DEFAULTS.get(name))
    if name in NAMESERVERS:
        spec = spec.with_dns_servers(tuple(ipaddress.ip_address(a) for a in NAMESERVERS[name]))
    return spec.with_ipv6(False) if spec.ipv6 is IPv6Policy.AUTO else spec


def _rendered(name: str) -> tuple[str, str]:
    spec = _spec(name)
    ruleset = plan.build(spec)
    text = "".join(f"# IPv{f.family}\n{iptables.render(f)}" for f in ruleset.families)
    text += "".join(f"# ip -{r.family} rule fwmark {r.mark} lookup {r.table}\n" for r in ruleset.routes)
    return text, nftables.render(ruleset)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_golden(name: str) -> None:
    ipt, nft = _rendered(name)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        (GOLDEN / f"{name}.iptables").write_text(ipt)
        (GOLDEN / f"{name}.nft").write_text(nft)
    assert ipt == (GOLDEN / f"{name}.iptables").read_text()
    assert nft == (GOLDEN / f"{name}.nft").read_text()


def test_default_matches_istio_reference_rule_set() -> None:
    ruleset = plan.build(build_spec({}).with_ipv6(False))
    v4 = ruleset.family(4)
    assert v4 is not None
    assert iptables.render(v4) == ISTIO_DEFAULT_NAT


def test_drop_invalid_is_istios_first_mangle_prerouting_rule() -> None:
    """istio-iptables --drop-invalid: `-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP` and
    `-A ISTIO_DROP -j DROP` in mangle, before TPROXY's own jump; in both families, IPv6 captured or not."""
    for pod in ({}, {ann.INTERCEPTION_MODE: "TPROXY"}):
        for capture_v6 in (False, True):
            ruleset = plan.build(build_spec(pod, {"drop_invalid": "true"}).with_ipv6(capture_v6))
            for family in ruleset.families:
                mangle = family.table("mangle")
                assert mangle is not None
                text = iptables.render(FamilyRules(family.family, (mangle,))).splitlines()
                hooks = [line for line in text if line.startswith("-A PREROUTING")]
                assert hooks[0] == "-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP"
                assert [line for line in text if line.startswith("-A ISTIO_DROP")] == [
                    "-A ISTIO_DROP -j DROP"
                ]
    plain = plan.build(build_spec({}).with_ipv6(True))
    assert all(f.table("mangle") is None for f in plain.families)


def _output_lines(spec: InterceptSpec) -> list[str]:
    v4 = plan.build(spec.with_ipv6(False)).family(4)
    assert v4 is not None
    return [line for line in iptables.render(v4).splitlines() if line.startswith("-A ISTIO_OUTPUT ")]


def test_owner_groups_follow_istio_order() -> None:
    """Istio's handleCaptureByOwnerGroup: right after the proxy gid's RETURN, before DNS and every capture;
    a list is one rule of negated matches, `*` one RETURN per excluded group."""
    gid_return = "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN"
    only = _output_lines(build_spec({ann.CAPTURE_DNS: "true"}, {"outbound_owner_groups": "202,1000"}))
    at = only.index(gid_return)
    assert only[at + 1 : at + 3] == [
        "-A ISTIO_OUTPUT -m owner ! --gid-owner 202 -m owner ! --gid-owner 1000 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS",
    ]
    but = _output_lines(build_spec({}, {"outbound_owner_groups_exclude": "888,0"}))
    at = but.index(gid_return)
    assert but[at + 1 : at + 4] == [
        "-A ISTIO_OUTPUT -m owner --gid-owner 888 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 0 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    ]
    # Exclusions apply to `*` only (Istio's InterceptFilter): beside a list they change nothing.
    listed = {"outbound_owner_groups": "202"}
    assert _output_lines(build_spec({}, {**listed, "outbound_owner_groups_exclude": "888"})) == _output_lines(
        build_spec({}, listed)
    )


def test_rendering_is_deterministic() -> None:
    for name in CONFIGS:
        assert _rendered(name) == _rendered(name)


# --- the waiter's probe path, for every capturing configuration --------------------------------------------


@dataclass(frozen=True)
class Packet:
    """A new TCP packet leaving through OUTPUT, as the model's matches see it (no mark, no conntrack)."""

    src: IPAddr
    dst: IPAddr
    dport: int
    oif: str
    uid: int
    gid: int
    sport: int = 40000
    proto: str = "tcp"


IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def _matches(match: Match, pkt: Packet) -> bool:
    hit: bool
    match match:
        case Proto(name):
            return pkt.proto == name
        case DPort(port, negate):
            hit = pkt.dport == port
        case DPorts(ports, negate):
            hit = pkt.dport in ports
        case SPort(port):
            return pkt.sport == port
        case Src(net, negate):
            hit = pkt.src in net
        case Dst(net, negate):
            hit = pkt.dst in net
        case OutIface(name):
            return pkt.oif == name
        case InIface(_):
            return False
        case UidOwner(uid, negate):
            hit = pkt.uid == uid
        case GidOwner(gid, negate):
            hit = pkt.gid == gid
        case CtState(states):
            return "NEW" in states
        case Mark(mark, negate):
            hit = mark == 0
        case ConnMark(mark):
            return mark == 0
    return hit != negate


def _verdict(table: TableRules, chain: ChainName, pkt: Packet) -> Target | None:
    """Walk `chain` of `table` for `pkt`: the terminating target reached, or None when the chain returns."""
    rules = next(c for c in table.chains if c.name == chain).rules
    for r in rules:
        if not all(_matches(m, pkt) for m in r.matches):
            continue
        match r.target:
            case Jump(target):
                if (found := _verdict(table, target, pkt)) is not None:
                    return found
            case Return():
                return None
            case SetMark() | SaveMark() | RestoreMark() | CtZone():
                continue
            case _:
                return r.target
    return None


def _nat_output(spec: InterceptSpec, family: Family, pkt: Packet) -> Target | None:
    rules = plan.build(spec).family(family)
    assert rules is not None
    nat = rules.table("nat")
    assert nat is not None
    for hook in nat.hooks:
        if hook.builtin == "OUTPUT" and all(_matches(m, pkt) for m in hook.rule.matches):
            assert isinstance(hook.rule.target, Jump)
            if (found := _verdict(nat, hook.rule.target.chain, pkt)) is not None:
                return found
    return None


CAPTURING = [name for name in sorted(CONFIGS) if _spec(name).intercepts]


@pytest.mark.parametrize("name", CAPTURING)
def test_waiter_probe_path_is_in_every_capturing_plan(name: str) -> None:
    """The waiter probes as the proxy uid: 127.0.0.1 -> 127.0.0.6:15002 (::1 -> ::6) over lo. Every
    capturing plan, outbound-only and TPROXY included, must send that connection to the inbound port."""
    spec = _spec(name)
    families: tuple[Family, ...] = (4, 6) if spec.ipv6 is IPv6Policy.CAPTURE else (4,)
    for family in families:
        pkt = Packet(
            ipaddress.ip_address(LOOPBACK[family]),
            ipaddress.ip_address(PASSTHROUGH[family]),
            PROBE_PORT,
            "lo",
            spec.proxy_uid,
            spec.proxy_gid,
        )
        assert _nat_output(spec, family, pkt) == Redirect(spec.inbound_port), (name, family)
        if name != "loopback-included":  # there, Istio captures the app's loopback traffic on purpose
            other = spec.proxy_uid + 1
            app = Packet(pkt.src, pkt.dst, PROBE_PORT, "lo", other, other)
            assert _nat_output(spec, family, app) is None, "the app's own loopback traffic is not captured"


def test_none_mode_renders_nothing() -> None:
    ruleset = plan.build(build_spec({ann.INTERCEPTION_MODE: "NONE"}).with_ipv6(True))
    assert ruleset.families == ()
    assert ruleset.routes == ()


def test_auto_ipv6_must_be_resolved_first() -> None:
    with pytest.raises(ValueError, match="resolve the IPv6 policy"):
        plan.build(build_spec({}))


def test_ipv6_block_rejects_new_inbound_except_loopback() -> None:
    v6 = plan.build(build_spec({}).with_ipv6(False)).family(6)
    assert v6 is not None
    assert iptables.render(v6) == (
        "*filter\n:ISTIO_BLOCK_INBOUND - [0:0]\n-A INPUT -j ISTIO_BLOCK_INBOUND\n"
        "-A ISTIO_BLOCK_INBOUND -i lo -j RETURN\n"
        "-A ISTIO_BLOCK_INBOUND -p tcp -m conntrack --ctstate NEW -j REJECT --reject-with tcp-reset\n"
        "-A ISTIO_BLOCK_INBOUND -p udp -m conntrack --ctstate NEW "
        "-j REJECT --reject-with icmp6-port-unreachable\n"
        "COMMIT\n"
    )


LIVE_SAVE = """\
# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_OUTPUT_DNS - [0:0]
:FOREIGN - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -j FOREIGN
-A OUTPUT -j ISTIO_OUTPUT_DNS
-A ISTIO_INBOUND -p tcp -j RETURN
-A ISTIO_OUTPUT_DNS -p udp -j RETURN
-A FOREIGN -p udp -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p icmp -j ACCEPT
COMMIT
"""


def test_apply_transaction_replaces_ours_and_never_names_foreign_rules() -> None:
    desired = plan.build(build_spec({}).with_ipv6(False)).family(4)
    assert desired is not None
    text = iptables.apply_transaction(desired, iptables.parse_save(LIVE_SAVE))
    lines = text.splitlines()
    assert lines[0] == "*nat"
    assert ":ISTIO_INBOUND - [0:0]" in lines and ":ISTIO_OUTPUT_DNS - [0:0]" in lines
    assert "-D PREROUTING -p tcp -j ISTIO_INBOUND" in lines
    assert "-D OUTPUT -j ISTIO_OUTPUT_DNS" in lines
    assert "-I PREROUTING 1 -p tcp -j ISTIO_INBOUND" in lines
    assert "-I OUTPUT 1 -j ISTIO_OUTPUT" in lines
    assert "-X ISTIO_OUTPUT_DNS" in lines
    assert not any("FOREIGN" in line for line in lines)
    assert "*filter" not in lines


def test_clean_transaction_only_touches_ours() -> None:
    text = iptables.clean_transaction(iptables.parse_save(LIVE_SAVE))
    assert text.splitlines() == [
        "*nat",
        ":ISTIO_INBOUND - [0:0]",
        ":ISTIO_OUTPUT_DNS - [0:0]",
        "-D PREROUTING -p tcp -j ISTIO_INBOUND",
        "-D OUTPUT -j ISTIO_OUTPUT_DNS",
        "-X ISTIO_INBOUND",
        "-X ISTIO_OUTPUT_DNS",
        "COMMIT",
    ]
    assert iptables.clean_transaction(iptables.parse_save("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")) == ""
