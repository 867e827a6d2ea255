"""The three rule backends behind one small interface, all executed inside the target namespace's thread.

- `legacy` and `nft`: iptables-legacy and iptables-nft, sharing the iptables renderer and transactions.
- `nftables`: native nft, one inet table of ours.
Expected state for verify is the backend's own listing of our rendered rules loaded into a scratch namespace
(cached per rendering), so verify compares like with like whatever the tool version prints.
Every tool runs through a `Runner` (tools.py), so tests can record the exact command sequence without root.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Callable
from typing import Literal, Protocol, TypeAlias

from ..netlink import FibRule, fib_rules
from ..rules import iptables, nftables
from ..rules.model import Family, PolicyRoute, Ruleset
from . import netns
from .tools import Runner, run

BackendName: TypeAlias = Literal["legacy", "nft", "nftables"]
BACKENDS: tuple[BackendName, ...] = ("legacy", "nft", "nftables")
FAMILIES: tuple[Family, Family] = (4, 6)


class Backend(Protocol):
    name: BackendName

    def apply(self, ruleset: Ruleset, *, present: bool) -> None:
        """Make our rules exactly `ruleset`; `present`: the backend holds tables here (else skip reading)."""

    def drift(self, ruleset: Ruleset) -> list[str]: ...

    def clean(self) -> None: ...


class IptablesBackend:
    """iptables-restore transactions (one per family, atomic per table) for the legacy or nft variant."""

    def __init__(self, name: Literal["legacy", "nft"], runner: Runner = run) -> None:
        self.name: BackendName = name
        self.run = runner

    def _tool(self, family: Family, verb: str) -> str:
        return f"{'ip' if family == 4 else 'ip6'}tables-{self.name}-{verb}"

    def _live(self, family: Family) -> dict[str, iptables.SavedTable]:
        return iptables.parse_save(self.run([self._tool(family, "save")]))

    def _restore(self, family: Family, text: str) -> None:
        if text:
            self.run([self._tool(family, "restore"), "--noflush", "--wait=10"], stdin=text)

    def apply(self, ruleset: Ruleset, *, present: bool) -> None:
        for family in FAMILIES:
            desired = ruleset.family(family)
            live = self._live(family) if present else {}
            if desired is None:
                self._restore(family, iptables.clean_transaction(live))
            else:
                self._restore(family, iptables.apply_transaction(desired, live))

    def clean(self) -> None:
        for family in FAMILIES:
            self._restore(family, iptables.clean_transaction(self._live(family)))

    def drift(self, ruleset: Ruleset) -> list[str]:
        report: list[str] = []
        for family in FAMILIES:
            desired = ruleset.family(family)
            text = iptables.render(desired) if desired else ""
            expected = _canonical_iptables(self.name, family, text)
            report += _iptables_drift(f"IPv{family}", expected, self._live(family))
        return report


@functools.lru_cache(maxsize=256)
def _canonical_iptables(variant: str, family: Family, text: str) -> dict[str, iptables.SavedTable]:
    """Our rules as the tool itself prints them, from a scratch namespace holding nothing else."""
    prefix = "ip" if family == 4 else "ip6"

    def load() -> str:
        if text:
            run([f"{prefix}tables-{variant}-restore"], stdin=text)
        return run([f"{prefix}tables-{variant}-save"])

    return iptables.parse_save(netns.run_in_scratch(load))


def _iptables_drift(
    label: str, expected: dict[str, iptables.SavedTable], live: dict[str, iptables.SavedTable]
) -> list[str]:
    report = []
    for table in sorted(set(expected) | set(live)):
        want = expected.get(table, iptables.SavedTable())
        have = live.get(table, iptables.SavedTable())
        want_hooks = {b: [t for _, t in hooks] for b, hooks in want.hooks().items()}
        have_hooks = have.hooks()
        for builtin in sorted(set(want_hooks) | set(have_hooks)):
            wanted = want_hooks.get(builtin, [])
            found = have_hooks.get(builtin, [])
            top = [text for position, text in found if position < len(wanted)]
            if [text for _, text in found] != wanted or top != wanted:
                report.append(f"{label} {table} {builtin}: jumps into our chains must be the first rules")
                report += _diff(
                    [f"-A {builtin} {t}" for t in wanted],
                    [f"-A {builtin} {t}   (position {p + 1})" for p, t in found],
                )
        want_chains, have_chains = want.ours(), have.ours()
        for chain in sorted(set(want_chains) | set(have_chains)):
            if chain not in have_chains:
                report.append(f"{label} {table}: chain {chain} is missing")
            elif chain not in want_chains:
                report.append(f"{label} {table}: chain {chain} should not exist")
            if want_chains.get(chain, []) != have_chains.get(chain, []):
                report += _diff(
                    [f"-A {chain} {t}" for t in want_chains.get(chain, [])],
                    [f"-A {chain} {t}" for t in have_chains.get(chain, [])],
                )
    return report


def _diff(expected: list[str], live: list[str]) -> list[str]:
    lines = difflib.unified_diff(expected, live, "expected", "live", n=1, lineterm="")
    return ["  " + line for line in lines]


class NftablesBackend:
    """One `nft -f` transaction replacing the whole inet table of ours."""

    name: BackendName = "nftables"

    def __init__(self, runner: Runner = run) -> None:
        self.run = runner

    def apply(self, ruleset: Ruleset, *, present: bool) -> None:
        self.run(["nft", "-f", "-"], stdin=nftables.apply_script(ruleset, replace=present))

    def clean(self) -> None:
        self.run(["nft", "-f", "-"], stdin=nftables.clean_script())

    def drift(self, ruleset: Ruleset) -> list[str]:
        expected = _canonical_nft(nftables.render(ruleset) if ruleset.families else "")
        live = _nft_listing(self.run)
        if expected == live:
            return []
        return [f"nftables table inet {nftables.TABLE} differs", *_diff(expected, live)]


def _nft_listing(runner: Runner = run) -> list[str]:
    tables = runner(["nft", "list", "tables"]).split()
    if nftables.TABLE not in tables:
        return []
    text = runner(["nft", "list", "table", "inet", nftables.TABLE])
    return [line.strip() for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=256)
def _canonical_nft_cached(text: str) -> tuple[str, ...]:
    def load() -> list[str]:
        if text:
            run(["nft", "-f", "-"], stdin=text)
        return _nft_listing()

    return tuple(netns.run_in_scratch(load))


def _canonical_nft(text: str) -> list[str]:
    return list(_canonical_nft_cached(text))


def make(name: BackendName, runner: Runner = run) -> Backend:
    return NftablesBackend(runner) if name == "nftables" else IptablesBackend(name, runner)


# --- policy routing for TPROXY -----------------------------------------------------------------------------


def _count(route: PolicyRoute, rules: list[FibRule]) -> int:
    return sum(1 for r in rules if (r.family, r.fwmark, r.table) == (route.family, route.mark, route.table))


def sync_routes(
    routes: tuple[PolicyRoute, ...],
    *,
    all_ours: tuple[PolicyRoute, ...],
    flush: bool = False,
    runner: Runner = run,
    read_rules: Callable[[], list[FibRule]] = fib_rules,
) -> None:
    """Make exactly `routes` present: one fwmark rule and one local default route per wanted family.

    Without `flush`, a family that has neither a wanted nor a leftover rule costs no process at all.
    """
    rules = read_rules()
    for route in all_ours:
        wanted = route in routes
        existing = _count(route, rules)
        fam, mark, table = f"-{route.family}", str(route.mark), str(route.table)
        for _ in range(existing - (1 if wanted else 0)):
            runner(["ip", fam, "rule", "del", "fwmark", mark, "lookup", table])
        if wanted:
            if not existing:
                runner(["ip", fam, "rule", "add", "fwmark", mark, "lookup", table])
            runner(["ip", fam, "route", "replace", "local", "default", "dev", "lo", "table", table])
        elif existing or flush:
            runner(["ip", fam, "route", "flush", "table", table], tolerate="does not exist")


def route_drift(routes: tuple[PolicyRoute, ...], *, all_ours: tuple[PolicyRoute, ...]) -> list[str]:
    report = []
    rules = fib_rules()
    for route in all_ours:
        count = _count(route, rules)
        wanted = 1 if route in routes else 0
        if count != wanted:
            report.append(
                f"IPv{route.family} policy rule 'fwmark {route.mark} lookup {route.table}': "
                f"expected {wanted}, found {count}"
            )
        if wanted:
            table = json.loads(
                run(["ip", f"-{route.family}", "-j", "route", "show", "table", str(route.table)]) or "[]"
            )
            if not any(r.get("type") == "local" and r.get("dst") == "default" for r in table):
                report.append(
                    f"IPv{route.family} route table {route.table}: 'local default dev lo' is missing"
                )
    return report
