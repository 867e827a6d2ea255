"""Read the foreign rules that can bypass capture from outside our chains (rules/foreign.py judges them).

Runs on the target namespace's thread, like the backends. Cheap when there is nothing to find: which
legacy tables exist comes from /proc; native nft chains and rules are read over netlink in-process (nft's
JSON output aborts on a name that is not UTF-8); an iptables save runs only for a rule system that holds a
table where such rules can sit.
"""

from __future__ import annotations

from ..netlink import nft_chains, nft_rule_expressions, nft_tables
from ..rules import foreign, iptables, nftables
from ..rules.foreign import Bypass
from ..rules.model import Family
from .backends import FAMILIES, BackendName
from .tools import Runner, run

_LEGACY_NAMES = {4: "/proc/thread-self/net/ip_tables_names", 6: "/proc/thread-self/net/ip6_tables_names"}


def _legacy_tables(family: Family) -> set[str]:
    try:
        with open(_LEGACY_NAMES[family], encoding="ascii", errors="replace") as handle:
            return set(handle.read().split())
    except OSError:
        return set()


def find(backend: BackendName, runner: Runner = run) -> list[Bypass]:
    """Every recognised bypass in the calling thread's namespace; `backend` holds our rules."""
    found: list[Bypass] = []
    tables = nft_tables()
    for family in FAMILIES:
        prefix = "ip" if family == 4 else "ip6"
        systems: dict[BackendName, set[str]] = {
            "legacy": _legacy_tables(family),
            "nft": {name for fam, name in tables if fam == prefix},  # iptables-nft's tables are nft tables
        }
        for system, names in systems.items():
            if "raw" in names or ("nat" in names and backend != system):
                saved = iptables.parse_save(runner([f"{prefix}tables-{system}-save"]))
                holds = backend == system
                found += foreign.in_iptables_save(saved, f"iptables-{system}", family, holds_ours=holds)
    native = [
        (fam, name)
        for fam, name in tables
        if (fam, name) != ("inet", nftables.TABLE)
        and not (fam in {"ip", "ip6"} and name in foreign.COMPAT_TABLES)
    ]
    if native:
        found += foreign.in_nft(nft_chains(), nft_rule_expressions(), nftables.TABLE)
    return found
