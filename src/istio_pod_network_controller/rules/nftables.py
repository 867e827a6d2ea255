"""Render the rule model as one native nftables `inet` table owned by this project.

Each (table, family) pair of the model becomes regular chains named `<table><family>_<CHAIN>`; one base chain
per (table, hook) dispatches on `meta nfproto` into them, at the priority of the iptables table it stands
for, so both backends see packets at the same points. Apply is a single `nft -f` transaction that creates,
deletes and recreates the table: atomic and idempotent by construction.
"""

from __future__ import annotations

from .invariants import check_nft
from .model import (
    TABLE_ORDER,
    Accept,
    ConnMark,
    CtState,
    CtZone,
    DPort,
    DPorts,
    Drop,
    Dst,
    Family,
    GidOwner,
    InIface,
    Jump,
    Mark,
    Match,
    OutIface,
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
    TableName,
    Target,
    Tproxy,
    UidOwner,
)

TABLE = "istio_pod_network"
_HOOK_OF = {"PREROUTING": "prerouting", "OUTPUT": "output", "INPUT": "input"}
_BASE_CHAIN = {
    ("raw", "PREROUTING"): ("filter", "raw"),
    ("raw", "OUTPUT"): ("filter", "raw"),
    ("mangle", "PREROUTING"): ("filter", "mangle"),
    ("mangle", "OUTPUT"): ("route", "mangle"),  # `route`: a changed mark re-routes, as in iptables' mangle
    ("nat", "PREROUTING"): ("nat", "dstnat"),
    ("nat", "OUTPUT"): ("nat", "-100"),
    ("filter", "INPUT"): ("filter", "filter"),
}
"""(iptables table, built-in chain) -> (nft chain type, priority) of the base chain standing in for it."""


def chain_name(table: TableName, family: Family, chain: str) -> str:
    return f"{table}{family}_{chain}"


def _ip(family: Family) -> str:
    return "ip" if family == 4 else "ip6"


def _op(negate: bool) -> str:
    return "!= " if negate else ""


def _match(match: Match, family: Family, proto: str) -> str | None:
    match match:
        case Proto(name):
            return f"meta l4proto {name}"
        case DPort(port, negate):
            return f"{proto} dport {_op(negate)}{port}"
        case DPorts(ports, negate):
            return f"{proto} dport {_op(negate)}{{ {', '.join(str(p) for p in ports)} }}"
        case SPort(port):
            return f"{proto} sport {port}"
        case Src(net, negate):
            return f"{_ip(family)} saddr {_op(negate)}{net}"
        case Dst(net, negate):
            return f"{_ip(family)} daddr {_op(negate)}{net}"
        case InIface(name):
            return f'iifname "{name}"'
        case OutIface(name):
            return f'oifname "{name}"'
        case UidOwner(uid, negate):
            return f"meta skuid {_op(negate)}{uid}"
        case GidOwner(gid, negate):
            return f"meta skgid {_op(negate)}{gid}"
        case CtState(states):
            return "ct state " + ",".join(state.lower() for state in states)
        case Mark(mark, negate):
            return f"meta mark {_op(negate)}{mark:#x}"
        case ConnMark(mark):
            return f"ct mark {mark:#x}"
    raise AssertionError(match)


def _target(target: Target, table: TableName, family: Family) -> str:
    match target:
        case Return():
            return "return"
        case Accept():
            return "accept"
        case Drop():
            return "drop"
        case Jump(chain):
            return f"jump {chain_name(table, family, chain)}"
        case Redirect(port):
            return f"redirect to :{port}"
        case Tproxy(port, mark):
            return f"tproxy {_ip(family)} to :{port} meta mark set {mark:#x} accept"
        case SetMark(mark):
            return f"meta mark set {mark:#x}"
        case SaveMark():
            return "ct mark set meta mark"
        case RestoreMark():
            return "meta mark set ct mark"
        case CtZone(zone):
            return f"ct zone set {zone}"
        case Reject("tcp-reset"):
            return "reject with tcp reset"
        case Reject(_):
            return "reject with icmpx type port-unreachable"
    raise AssertionError(target)


def render_rule(rule: Rule, table: TableName, family: Family) -> str:
    proto = next((m.name for m in rule.matches if isinstance(m, Proto)), "th")
    has_port = any(isinstance(m, DPort | DPorts | SPort) for m in rule.matches)
    words = [
        text
        for m in rule.matches
        if not (isinstance(m, Proto) and has_port)  # `tcp dport` already implies the protocol
        if (text := _match(m, family, proto)) is not None
    ]
    return " ".join([*words, _target(rule.target, table, family)])


def render(ruleset: Ruleset) -> str:
    """The `table inet istio_pod_network { ... }` block for the whole ruleset, both families."""
    base: dict[tuple[TableName, str], list[str]] = {}
    regular: list[str] = []
    for family_rules in ruleset.families:
        family = family_rules.family
        nfproto = "ipv4" if family == 4 else "ipv6"
        for table in family_rules.tables:
            for hook in table.hooks:
                base.setdefault((table.table, hook.builtin), []).append(
                    f"meta nfproto {nfproto} {render_rule(hook.rule, table.table, family)}"
                )
            for chain in table.chains:
                body = [render_rule(r, table.table, family) for r in chain.rules]
                regular.append(_chain(chain_name(table.table, family, chain.name), None, body))
    chains = []
    for (table_name, builtin), rules in sorted(base.items(), key=lambda kv: TABLE_ORDER.index(kv[0][0])):
        kind, priority = _BASE_CHAIN[(table_name, builtin)]
        hook_name = _HOOK_OF[builtin]
        header = f"type {kind} hook {hook_name} priority {priority}; policy accept;"
        chains.append(_chain(f"{table_name}_{hook_name}", header, rules))
    return check_nft(f"table inet {TABLE} {{\n" + "".join([*chains, *regular]) + "}\n", TABLE)


def _chain(name: str, header: str | None, rules: list[str]) -> str:
    lines = [f"\tchain {name} {{"]
    if header:
        lines.append(f"\t\t{header}")
    lines += [f"\t\t{rule}" for rule in rules]
    lines.append("\t}")
    return "\n".join(lines) + "\n"


def apply_script(ruleset: Ruleset, *, replace: bool) -> str:
    """One `nft -f` transaction: (when our table may exist) ensure it, delete it; then define it anew.

    Deleting a table with nat chains costs the kernel about as much as creating one, so a namespace known
    to hold no table of ours gets the definition alone.
    """
    prefix = f"table inet {TABLE}\ndelete table inet {TABLE}\n" if replace else ""
    return prefix + render(ruleset) if ruleset.families else prefix


def clean_script() -> str:
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n"
