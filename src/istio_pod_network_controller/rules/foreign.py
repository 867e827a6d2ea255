"""Foreign rules that run before ours and can change a captured packet's fate (pure: saves and dumps in,
findings out).

Every rule of ours can be intact while an app with NET_ADMIN in its own namespace keeps its traffic
uncaptured from outside our chains: a raw-table `notrack` (an untracked packet meets no NAT rule, ours
included), or a nat chain that runs before ours (a connection is NAT'ed once, by the first nat chain that
binds it). These are the shapes recognised; each finding names where it sits in our own words, and the
tenant's table and chain names only escaped, for the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from ..errors import escaped
from .iptables import SavedTable
from .model import OUR_CHAINS, Family

NOTRACK: Final = "turns connection tracking off, so no NAT rule (ours included) sees the connection"
NAT_FIRST: Final = "NATs connections before our nat rules can (a connection is NAT'ed only once)"
NAT_ELSEWHERE: Final = (
    "NATs connections at our hook and priority from another rule system; either may run first"
)
NAT_PRIORITY: Final = -100
"""Our nat chains' priority, every backend (iptables' nat table; our nft base chains)."""
COMPAT_TABLES: Final = frozenset({"raw", "mangle", "nat", "filter", "security"})
"""iptables-nft's tables (families ip, ip6): read with iptables-nft-save, not as native nft."""
_HOOKS: Final = frozenset({"prerouting", "output"})
_FAMILIES: Final = frozenset({"ip", "ip6", "inet"})
_NOTRACK_WORDS: Final = frozenset({"--notrack", "NOTRACK"})
_NAT_TARGETS: Final = frozenset({"DNAT", "REDIRECT", "SNAT", "MASQUERADE", "NETMAP", "TPROXY"})
_NAT_EXPRESSIONS: Final = frozenset({"nat", "masq", "redir", "tproxy"})
"""What binds a connection's NAT (a nat chain whose rules only accept or return lets the next one run)."""


class NftChain(Protocol):
    """One nftables chain as the kernel holds it (netlink.NftChain is one)."""

    @property
    def family(self) -> str: ...
    @property
    def table(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def hook(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def type(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Bypass:
    where: str
    """Our words only (rule system, family, table, hook, priority): safe for an Event."""
    effect: str
    names: str = ""
    """The tenant's table/chain names, escaped: for the log only."""

    @property
    def public(self) -> str:
        return f"{self.where}: {self.effect}"

    def __str__(self) -> str:
        return f"{self.public} ({self.names})" if self.names else self.public


def in_iptables_save(
    tables: Mapping[str, SavedTable], system: str, family: Family, *, holds_ours: bool
) -> list[Bypass]:
    """Findings in one iptables save: any raw-table notrack; rules at nat PREROUTING/OUTPUT, in a nat table
    where some rule binds NAT, when this rule system does not hold ours (a foreign rule before our jump in
    ours is drift already)."""
    found: list[Bypass] = []
    for chain, rules in tables.get("raw", SavedTable()).chains.items():
        if chain in OUR_CHAINS:
            continue
        builtin = chain in {"PREROUTING", "OUTPUT"}
        for text in rules:
            if _NOTRACK_WORDS & set(text.split()):
                where = f"{system} IPv{family} raw {chain if builtin else 'chain of its own'}"
                found.append(Bypass(where, NOTRACK, "" if builtin else escaped(chain, 40)))
    nat = tables.get("nat", SavedTable())
    nats = any(
        _NAT_TARGETS & set(text.split()) for name, rules in nat.chains.items() if name not in OUR_CHAINS
        for text in rules
    )  # fmt: skip
    if not holds_ours and nats:
        for chain in ("PREROUTING", "OUTPUT"):
            if nat.chains.get(chain):
                found.append(Bypass(f"{system} IPv{family} nat {chain}", NAT_ELSEWHERE))
    return found


def in_nft(
    chains: Iterable[NftChain], rules: Mapping[tuple[str, str, str], list[frozenset[str]]], own_table: str
) -> list[Bypass]:
    """Findings among native nft chains (netlink.nft_chains / nft_rule_expressions): `notrack` in any
    foreign chain; a foreign nat base chain with rules at prerouting/output that runs no later than ours, in
    a table where some rule binds NAT (its own, or a chain it jumps to). Our table and iptables-nft's (read
    with its save tool) are skipped."""
    by_key = {(c.family, c.table, c.name): c for c in chains}
    nats = {(f, t) for (f, t, _), body in rules.items() if any(_NAT_EXPRESSIONS & e for e in body)}
    found: list[Bypass] = []
    for key in sorted(set(by_key) | set(rules)):
        family, table, name = key
        if family not in _FAMILIES or (family, table) == ("inet", own_table):
            continue  # bridge, netdev, arp chains never see the pod's IP hooks
        if family in {"ip", "ip6"} and table in COMPAT_TABLES:
            continue
        names = f"table {escaped(table, 40)} chain {escaped(name, 40)}"
        body = rules.get(key, [])
        if any("notrack" in expressions for expressions in body):
            found.append(Bypass(f"nft {family} chain", NOTRACK, names))
        chain = by_key.get(key)
        if chain is None or chain.type != "nat" or chain.hook not in _HOOKS:
            continue
        if chain.priority is not None and chain.priority <= NAT_PRIORITY and body and (family, table) in nats:
            where = f"nft {family} nat chain at {chain.hook} priority {chain.priority}"
            found.append(Bypass(where, NAT_FIRST, names))
    return found
