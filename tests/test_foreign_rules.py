"""rules/foreign.py: which foreign rules can bypass capture from outside our chains (pure, no root)."""

from __future__ import annotations

from dataclasses import dataclass

from istio_pod_network_controller.rules import foreign, iptables, nftables

SAVE = """\
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT_DNS - [0:0]
:mine\ufffd - [0:0]
-A OUTPUT -j ISTIO_OUTPUT_DNS
-A OUTPUT -j mine\ufffd
-A PREROUTING -p tcp --sport 9090 -j CT --notrack
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 1
-A mine\ufffd -m owner --uid-owner 1000 -j NOTRACK
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -j DNAT --to-destination 10.0.0.2:9090
COMMIT
"""


@dataclass(frozen=True)
class Chain:
    family: str
    table: str
    name: str
    hook: str | None = None
    priority: int | None = None
    type: str = "filter"


def test_raw_notrack_anywhere_and_nat_in_a_system_without_ours() -> None:
    tables = iptables.parse_save(SAVE)
    found = foreign.in_iptables_save(tables, "iptables-legacy", 4, holds_ours=False)
    assert [b.public for b in found] == [
        f"iptables-legacy IPv4 raw PREROUTING: {foreign.NOTRACK}",
        f"iptables-legacy IPv4 raw chain of its own: {foreign.NOTRACK}",
        f"iptables-legacy IPv4 nat OUTPUT: {foreign.NAT_ELSEWHERE}",
    ]
    assert "\ufffd" not in "".join(b.public for b in found)  # the tenant's names: log only, escaped
    assert found[1].names.startswith("mine") and not found[0].names
    # our own CT --zone rule is not a finding; a nat rule where ours live is drift's business
    held = foreign.in_iptables_save(tables, "iptables-legacy", 4, holds_ours=True)
    quiet = iptables.parse_save(
        "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p udp --dport 9999 -j RETURN\nCOMMIT\n"
    )
    assert foreign.in_iptables_save(quiet, "iptables-nft", 6, holds_ours=False) == []  # binds no NAT
    where = [b.where for b in held]
    assert where == ["iptables-legacy IPv4 raw PREROUTING", "iptables-legacy IPv4 raw chain of its own"]


def test_nft_nat_chains_that_run_no_later_than_ours_and_notrack() -> None:
    chains = [
        Chain("ip", "tenant", "early", "output", -150, "nat"),
        Chain("ip", "tenant", "same", "prerouting", -100, "nat"),
        Chain("ip", "tenant", "later", "output", -99, "nat"),
        Chain("ip", "tenant", "empty", "output", -200, "nat"),
        Chain("inet", "quiet", "out", "output", -100, "nat"),
        Chain("inet", "tenant", "raw", "output", -300),
        Chain("inet", nftables.TABLE, "nat_output", "output", -100, "nat"),
        Chain("ip", "nat", "OUTPUT", "output", -100, "nat"),
        Chain("bridge", "tenant", "br", "output", -300),
    ]
    rule = [frozenset({"meta", "cmp", "nat"})]
    rules = {
        ("ip", "tenant", "early"): rule,
        ("ip", "tenant", "same"): rule,
        ("ip", "tenant", "later"): rule,
        ("inet", "tenant", "raw"): [frozenset({"meta", "cmp"}), frozenset({"notrack"})],
        ("inet", "quiet", "out"): [frozenset({"payload", "cmp", "immediate"})],  # returns, never NATs
        ("inet", nftables.TABLE, "nat_output"): [frozenset({"notrack", "nat"})],
        ("ip", "nat", "OUTPUT"): rule,
        ("bridge", "tenant", "br"): [frozenset({"notrack"})],
    }
    found = foreign.in_nft(chains, rules, nftables.TABLE)
    assert sorted(b.where for b in found) == [
        "nft inet chain",
        "nft ip nat chain at output priority -150",
        "nft ip nat chain at prerouting priority -100",
    ]
    assert all("tenant" in b.names and "tenant" not in b.public for b in found)
