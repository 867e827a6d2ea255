"""The backend-neutral rule model: matches and targets as small frozen dataclasses.

`plan.build` fills it from an InterceptSpec; `iptables` and `nftables` render it. Keeping the decision of
*what* to match in one place is what lets the two backends behave identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, TypeAlias

from ..settings.addresses import Family
from ..settings.spec import IPNetwork

__all__ = ["Family"]
TableName: TypeAlias = Literal["raw", "mangle", "nat", "filter"]
TABLE_ORDER: tuple[TableName, ...] = ("raw", "mangle", "nat", "filter")


class ChainName(StrEnum):
    """Every chain of ours, in any table (a name may recur in several tables, as in Istio)."""

    INBOUND = "ISTIO_INBOUND"
    IN_REDIRECT = "ISTIO_IN_REDIRECT"
    OUTPUT = "ISTIO_OUTPUT"
    REDIRECT = "ISTIO_REDIRECT"
    OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
    INBOUND_DNS = "ISTIO_INBOUND_DNS"
    DIVERT = "ISTIO_DIVERT"
    TPROXY = "ISTIO_TPROXY"
    OUTPUT_MARK = "ISTIO_OUTPUT_MARK"
    BLOCK_INBOUND = "ISTIO_BLOCK_INBOUND"
    DROP = "ISTIO_DROP"


OUR_CHAINS: frozenset[str] = frozenset(name.value for name in ChainName)
"""Every chain name `plan` can produce: the iptables backends own exactly these, and jumps into them."""


@dataclass(frozen=True, slots=True)
class Proto:
    name: Literal["tcp", "udp"]


@dataclass(frozen=True, slots=True)
class DPort:
    port: int
    negate: bool = False


@dataclass(frozen=True, slots=True)
class DPorts:
    """Several destination ports at once (iptables' multiport), e.g. Istio's `! --dports 53,15008`."""

    ports: tuple[int, ...]
    negate: bool = False


@dataclass(frozen=True, slots=True)
class SPort:
    port: int


@dataclass(frozen=True, slots=True)
class Src:
    net: IPNetwork
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Dst:
    net: IPNetwork
    negate: bool = False


@dataclass(frozen=True, slots=True)
class InIface:
    name: str


@dataclass(frozen=True, slots=True)
class OutIface:
    name: str


@dataclass(frozen=True, slots=True)
class UidOwner:
    uid: int
    negate: bool = False


@dataclass(frozen=True, slots=True)
class GidOwner:
    gid: int
    negate: bool = False


@dataclass(frozen=True, slots=True)
class CtState:
    """Conntrack state of the packet's connection: ("NEW",), ("RELATED", "ESTABLISHED") or ("INVALID",)."""

    states: tuple[Literal["NEW", "RELATED", "ESTABLISHED", "INVALID"], ...]


@dataclass(frozen=True, slots=True)
class Mark:
    """The packet's firewall mark equals `mark` (or differs from it)."""

    mark: int
    negate: bool = False


@dataclass(frozen=True, slots=True)
class ConnMark:
    """The connection's conntrack mark equals `mark`."""

    mark: int


Match: TypeAlias = (
    Proto
    | DPort
    | DPorts
    | SPort
    | Src
    | Dst
    | InIface
    | OutIface
    | UidOwner
    | GidOwner
    | CtState
    | Mark
    | ConnMark
)


@dataclass(frozen=True, slots=True)
class Return:
    pass


@dataclass(frozen=True, slots=True)
class Accept:
    pass


@dataclass(frozen=True, slots=True)
class Drop:
    pass


@dataclass(frozen=True, slots=True)
class Jump:
    chain: ChainName


@dataclass(frozen=True, slots=True)
class Redirect:
    port: int


@dataclass(frozen=True, slots=True)
class Tproxy:
    port: int
    mark: int


@dataclass(frozen=True, slots=True)
class SetMark:
    mark: int


@dataclass(frozen=True, slots=True)
class SaveMark:
    """Copy the packet's mark to its connection (CONNMARK --save-mark); the rule goes on."""


@dataclass(frozen=True, slots=True)
class RestoreMark:
    """Copy the connection's mark to the packet (CONNMARK --restore-mark); the rule goes on."""


@dataclass(frozen=True, slots=True)
class CtZone:
    zone: int


@dataclass(frozen=True, slots=True)
class Reject:
    with_: Literal["tcp-reset", "port-unreachable"]


Target: TypeAlias = (
    Return | Accept | Drop | Jump | Redirect | Tproxy | SetMark | SaveMark | RestoreMark | CtZone | Reject
)


@dataclass(frozen=True, slots=True)
class Rule:
    matches: tuple[Match, ...]
    target: Target


@dataclass(frozen=True, slots=True)
class Chain:
    name: ChainName
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Hook:
    """A rule in a built-in chain (PREROUTING, OUTPUT, INPUT) that enters one of our chains."""

    builtin: str
    rule: Rule


@dataclass(frozen=True, slots=True)
class TableRules:
    table: TableName
    hooks: tuple[Hook, ...]
    chains: tuple[Chain, ...]


@dataclass(frozen=True, slots=True)
class FamilyRules:
    family: Family
    tables: tuple[TableRules, ...]

    def table(self, name: TableName) -> TableRules | None:
        return next((t for t in self.tables if t.table == name), None)


@dataclass(frozen=True, slots=True)
class PolicyRoute:
    """`ip rule fwmark MARK lookup TABLE` plus `ip route local default dev lo table TABLE` (TPROXY)."""

    family: Family
    mark: int
    table: int


@dataclass(frozen=True, slots=True)
class Ruleset:
    families: tuple[FamilyRules, ...]
    routes: tuple[PolicyRoute, ...]

    def family(self, family: Family) -> FamilyRules | None:
        return next((f for f in self.families if f.family == family), None)
