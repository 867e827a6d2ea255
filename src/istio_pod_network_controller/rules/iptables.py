"""Render the rule model as `iptables-restore` input, and compute the idempotent apply transaction.

One renderer serves iptables-legacy and iptables-nft alike (same restore language). `render` gives the
readable whole ruleset (goldens, `rules render`, the scratch-netns canonical form); `transaction` turns the
same rules into one `--noflush` restore per family that replaces whatever of ours is live and leaves every
foreign rule alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .invariants import check_restore, check_words
from .model import (
    OUR_CHAINS,
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
    FamilyRules,
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
    SaveMark,
    SetMark,
    SPort,
    Src,
    TableRules,
    Target,
    Tproxy,
    UidOwner,
)


def _neg(negate: bool) -> list[str]:
    return ["!"] if negate else []


def _match(match: Match, family: Family) -> list[str]:
    match match:
        case Proto(name):
            return ["-p", name]
        case DPort(port, negate):
            return [*_neg(negate), "--dport", str(port)]
        case DPorts(ports, negate):
            return ["-m", "multiport", *_neg(negate), "--dports", ",".join(str(p) for p in ports)]
        case SPort(port):
            return ["--sport", str(port)]
        case Src(net, negate):
            return [*_neg(negate), "-s", str(net)]
        case Dst(net, negate):
            return [*_neg(negate), "-d", str(net)]
        case InIface(name):
            return ["-i", name]
        case OutIface(name):
            return ["-o", name]
        case UidOwner(uid, negate):
            return ["-m", "owner", *_neg(negate), "--uid-owner", str(uid)]
        case GidOwner(gid, negate):
            return ["-m", "owner", *_neg(negate), "--gid-owner", str(gid)]
        case CtState(states):
            return ["-m", "conntrack", "--ctstate", ",".join(states)]
        case Mark(mark, negate):
            return ["-m", "mark", *_neg(negate), "--mark", f"{mark:#x}"]
        case ConnMark(mark):
            return ["-m", "connmark", "--mark", f"{mark:#x}"]
    raise AssertionError(match)


def _target(target: Target, family: Family) -> list[str]:
    match target:
        case Return():
            return ["-j", "RETURN"]
        case Accept():
            return ["-j", "ACCEPT"]
        case Drop():
            return ["-j", "DROP"]
        case Jump(chain):
            return ["-j", chain]
        case Redirect(port):
            return ["-j", "REDIRECT", "--to-ports", str(port)]
        case Tproxy(port, mark):
            return ["-j", "TPROXY", "--on-port", str(port), "--tproxy-mark", f"{mark:#x}/0xffffffff"]
        case SetMark(mark):
            return ["-j", "MARK", "--set-xmark", f"{mark:#x}/0xffffffff"]
        case SaveMark():
            return ["-j", "CONNMARK", "--save-mark"]
        case RestoreMark():
            return ["-j", "CONNMARK", "--restore-mark"]
        case CtZone(zone):
            return ["-j", "CT", "--zone", str(zone)]
        case Reject("tcp-reset"):
            return ["-j", "REJECT", "--reject-with", "tcp-reset"]
        case Reject(_):
            kind = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
            return ["-j", "REJECT", "--reject-with", kind]
    raise AssertionError(target)


def rule_args(rule: Rule, family: Family) -> str:
    """The rule's arguments after `-A CHAIN`, as iptables-restore reads them."""
    words = [word for match in rule.matches for word in _match(match, family)]
    return " ".join(check_words([*words, *_target(rule.target, family)]))


def render(rules: FamilyRules) -> str:
    """The whole ruleset for a fresh namespace, in iptables-save order: tables, chains, hooks, rules."""
    lines: list[str] = []
    for table in sorted(rules.tables, key=lambda t: TABLE_ORDER.index(t.table)):
        lines.append(f"*{table.table}")
        lines += [f":{chain.name} - [0:0]" for chain in table.chains]
        lines += [f"-A {hook.builtin} {rule_args(hook.rule, rules.family)}" for hook in table.hooks]
        for chain in table.chains:
            lines += [f"-A {chain.name} {rule_args(r, rules.family)}" for r in chain.rules]
        lines.append("COMMIT")
    return check_restore("\n".join(lines) + "\n", tables={t.table for t in rules.tables})


# --- reading live state ------------------------------------------------------------------------------------


@dataclass
class SavedTable:
    """One table of `iptables-save` output: chain order and each chain's rules (text after `-A NAME `)."""

    chains: dict[str, list[str]] = field(default_factory=dict)

    def ours(self) -> dict[str, list[str]]:
        return {name: rules for name, rules in self.chains.items() if name in OUR_CHAINS}

    def hooks(self) -> dict[str, list[tuple[int, str]]]:
        """Built-in chain -> (position, rule) of each rule that jumps into one of our chains."""
        found: dict[str, list[tuple[int, str]]] = {}
        for name, rules in self.chains.items():
            if name in OUR_CHAINS:
                continue
            for position, text in enumerate(rules):
                if _jump_target(text) in OUR_CHAINS:
                    found.setdefault(name, []).append((position, text))
        return found


def _jump_target(rule_text: str) -> str | None:
    words = rule_text.split()
    for index, word in enumerate(words[:-1]):
        if word in {"-j", "-g", "--jump", "--goto"}:
            return words[index + 1]
    return None


def parse_save(text: str) -> dict[str, SavedTable]:
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), SavedTable())
        elif current is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            current.chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.chains.setdefault(chain, []).append(rest[0] if rest else "")
    return tables


# --- the apply and clean transactions ----------------------------------------------------------------------


def _transaction(desired: FamilyRules | None, live: dict[str, SavedTable]) -> str:
    wanted: dict[str, TableRules] = {t.table: t for t in desired.tables} if desired else {}
    family: Family = desired.family if desired else 4
    names: set[str] = set(wanted) | {name for name, saved in live.items() if saved.ours() or saved.hooks()}
    lines: list[str] = []
    for name in sorted(names, key=lambda n: TABLE_ORDER.index(n) if n in TABLE_ORDER else 99):
        table = wanted.get(name)
        saved = live.get(name, SavedTable())
        keep = {chain.name for chain in table.chains} if table else set()
        stale = [chain for chain in saved.ours() if chain not in keep]
        lines.append(f"*{name}")
        lines += [f":{chain} - [0:0]" for chain in [*sorted(keep), *stale]]
        for builtin, found in saved.hooks().items():
            lines += [f"-D {builtin} {text}" for _, text in found]
        if table:
            position: dict[str, int] = {}
            for hook in table.hooks:
                position[hook.builtin] = position.get(hook.builtin, 0) + 1
                lines.append(f"-I {hook.builtin} {position[hook.builtin]} {rule_args(hook.rule, family)}")
            for chain in table.chains:
                lines += [f"-A {chain.name} {rule_args(r, family)}" for r in chain.rules]
        lines += [f"-X {chain}" for chain in stale]
        lines.append("COMMIT")
    return check_restore("\n".join(lines) + "\n", tables=names) if lines else ""


def apply_transaction(desired: FamilyRules, live: dict[str, SavedTable]) -> str:
    """`iptables-restore --noflush` input that makes our rules exactly `desired`, atomically per table.

    Our chains are declared (created, or flushed when they exist) and refilled; every live jump into them
    from a built-in chain is deleted by its exact saved text and the wanted ones are inserted at the top,
    so re-applying leaves one copy and foreign rules are never touched; chains of ours that the new spec
    no longer needs are deleted.
    """
    return _transaction(desired, live)


def clean_transaction(live: dict[str, SavedTable]) -> str:
    """Restore input that removes every chain of ours and every jump into them, and nothing else."""
    return _transaction(None, live)
