"""Hostile values for every setting, written the way an attacker writes them, and the one property they
must meet: refused with a SpecError naming the input, or rules whose loaded state in a scratch network
namespace holds exactly the chains, tables and rules the plan produced (real tools, every backend, both
families).

The values start from a valid value of the setting's own kind (so a parser that forgets a check accepts
them) and add the pieces that break out of a rule language: line and paragraph separators, NUL, IPv6
`%scopes`, quotes, comment and block characters, `include`, `COMMIT`, table headers, options, huge lengths.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable

from hypothesis import strategies as st

from istio_pod_network_controller.dataplane import backends, netns
from istio_pod_network_controller.dataplane.tools import run
from istio_pod_network_controller.errors import SHOWN_LENGTH, SpecError
from istio_pod_network_controller.rules import iptables, nftables, plan
from istio_pod_network_controller.rules.model import Ruleset
from istio_pod_network_controller.settings import spec as spec_mod
from istio_pod_network_controller.settings.spec import InterceptSpec, IPv6Policy

IPTABLES_ATTACK = (
    "fe80::%lo -j RETURN\n-A ISTIO_OUTPUT -m owner --uid-owner 1000 -j RETURN\nCOMMIT\n*filter\n"
    ":ATTACK - [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"
)
"""Issue 12's iptables attack: a scope that closes the rule, adds one, commits and opens another table."""
NFT_ATTACK = 'fe80::%lo return\ninclude "shadow"\nip6 daddr ::1'
"""Issue 12's nftables attack: a scope that ends the rule and makes nft read a file."""

FRAGMENTS = [
    "\n", "\r\n", "\r", "\0", "\u2028", "\u2029", "\x85", "\t", "\x0b", "\x0c", "\x1b[2J", "\u202e", " ",
    "%lo", "%eth0", "%lo -j RETURN", "%1", "%", '"', "'", "`", ";", "#", "{", "}", "$x", "\\", "@set",
    'include "/etc/shadow"', "include", "COMMIT", "\nCOMMIT\n", "*filter", "\n*filter\n", ":X - [0:0]",
    "-j ACCEPT", " -j ACCEPT", "-A ISTIO_OUTPUT -j RETURN", "\n-A OUTPUT -j ACCEPT", "ip6 daddr ::1",
    "; flush ruleset", "} table ip x {", "-", "--", "-jACCEPT", "..", "/", "/32", "::", ",", "*", "!",
    "0x1", "+", " return\n", IPTABLES_ATTACK, NFT_ATTACK,
]  # fmt: skip
BASES: dict[Callable[[str, str], object], list[str]] = {
    spec_mod.parse_mode: ["REDIRECT", "TPROXY", "NONE"],
    spec_mod.parse_port: ["15001", "8080"],
    spec_mod.parse_id: ["1337", "1000"],
    spec_mod.parse_ports_or_wildcard: ["*", "80,443", ""],
    spec_mod.parse_ports: ["80", "80,443", ""],
    spec_mod.parse_cidrs_or_wildcard: ["*", "10.0.0.0/8", "fe80::/10,::1/128"],
    spec_mod.parse_cidrs: ["10.0.0.0/8", "fe80::", "fe80::/10", "192.168.0.0/16,fd00::/8"],
    spec_mod.parse_interfaces: ["eth0", "net1,eth0", "lo"],
    spec_mod.parse_bool: ["true", "false"],
    spec_mod.parse_ipv6: ["capture", "block", "auto"],
    spec_mod.parse_status_port: ["15020", "0", "16000"],
    spec_mod.parse_groups_or_wildcard: ["*", "1000,2000", "0"],
    spec_mod.parse_groups: ["1000", "888,0", ""],
}


def _insert(base: str, pieces: list[tuple[int, str]]) -> str:
    text = base
    for position, piece in pieces:
        cut = position % (len(text) + 1)
        text = text[:cut] + piece + text[cut:]
    return text


@functools.cache
def hostile(parse: Callable[[str, str], object], *, allow_nul: bool = True) -> st.SearchStrategy[str]:
    """Hostile values for one parser's kind of setting (built once: tests draw it inside every example)."""
    fragments = FRAGMENTS if allow_nul else [f for f in FRAGMENTS if "\0" not in f]
    base = st.sampled_from(BASES[parse])
    fragment = st.sampled_from(fragments)
    alphabet = st.sampled_from("\n\r\t\0\u2028\u2029\x85\x1b%\"';#{}$-*:/., !\\")
    alphabet = alphabet if allow_nul else alphabet.filter(lambda c: c != "\0")
    return st.one_of(
        st.builds(_insert, base, st.lists(st.tuples(st.integers(0, 60), fragment), min_size=1, max_size=3)),
        st.builds(lambda b, f: b + f, base, fragment),
        st.builds(lambda f, b: f + b, fragment, base),
        st.text(alphabet, max_size=60),
        st.builds(lambda b, n, f: ",".join([b] * n) + f, base, st.integers(300, 1500), fragment),
        st.builds(lambda b, f, n: b + " " * n + f, base, fragment, st.integers(1, 5000)),
        st.sampled_from([IPTABLES_ATTACK, NFT_ATTACK, "fe80::%lo", f"fe80::%{'x' * 4000}"]),
    )


def assert_refusal_names(exc: SpecError, source: str, raw: str) -> None:
    """The refusal names the input and keeps the raw value, but shows it only escaped (one printable line,
    so a value with any control character or separator never appears as it is) and cut (bounded)."""
    assert exc.source == source
    assert exc.value == raw
    for text in (exc.public, str(exc)):
        assert text.startswith(f"{source}: invalid value '")
        assert text.isprintable(), text
        assert len(text) < 2 * SHOWN_LENGTH + 600


def policies(spec: InterceptSpec) -> list[InterceptSpec]:
    return [spec.with_ipv6(False), spec.with_ipv6(True)] if spec.ipv6 is IPv6Policy.AUTO else [spec]


BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
_checked: set[str] = set()


def assert_loads_only_the_plan(spec: InterceptSpec) -> None:
    """Apply `spec` with every backend in fresh scratch namespaces; the loaded state is the plan's alone.

    Specs are canonical typed values, so most hostile values that parse collapse onto a few specs: each
    distinct one is loaded once per test session.
    """
    for resolved in policies(spec):
        if resolved.fingerprint() in _checked:
            continue
        ruleset = plan.build(resolved)
        for name in backends.BACKENDS:
            problems = netns.run_in_scratch(functools.partial(_apply_and_compare, name, ruleset))
            assert not problems, f"{name}: {problems}\n{resolved.describe()}"
        _checked.add(resolved.fingerprint())


def _apply_and_compare(name: backends.BackendName, ruleset: Ruleset) -> list[str]:
    backends.make(name).apply(ruleset, present=False)
    if name == "nftables":
        return _compare_nft(ruleset)
    problems = []
    for family in backends.FAMILIES:
        tool = f"{'ip' if family == 4 else 'ip6'}tables-{name}-save"
        problems += _compare_iptables(ruleset, family, iptables.parse_save(run([tool])))
    return problems


def _compare_iptables(ruleset: Ruleset, family: int, live: dict[str, iptables.SavedTable]) -> list[str]:
    """Tables, our chains and rule counts per chain, from the model (never from rendered text)."""
    wanted = ruleset.family(family)  # type: ignore[arg-type]
    expected = {t.table: t for t in wanted.tables} if wanted else {}
    problems = []
    for table_name, saved in live.items():
        table = expected.get(table_name)
        chains = {c.name: len(c.rules) for c in table.chains} if table else {}
        hooks = Counter(h.builtin for h in table.hooks) if table else Counter()
        for chain, rules in saved.chains.items():
            want = hooks.get(chain, 0) if chain in BUILTIN_CHAINS else chains.get(chain)
            if want is None:
                problems.append(f"IPv{family} {table_name}: chain {chain} the plan did not produce")
            elif len(rules) != want:
                problems.append(f"IPv{family} {table_name} {chain}: {len(rules)} rules, the plan has {want}")
        missing = set(chains) - set(saved.chains)
        if missing:
            problems.append(f"IPv{family} {table_name}: missing chains {sorted(missing)}")
    for table_name in set(expected) - set(live):
        problems.append(f"IPv{family}: table {table_name} is missing")
    return problems


def _compare_nft(ruleset: Ruleset) -> list[str]:
    listing = json.loads(run(["nft", "-j", "list", "ruleset"]))["nftables"]
    tables = [(o["table"]["family"], o["table"]["name"]) for o in listing if "table" in o]
    rules = Counter((o["rule"]["table"], o["rule"]["chain"]) for o in listing if "rule" in o)
    chains = {(o["chain"]["table"], o["chain"]["name"]) for o in listing if "chain" in o}
    expected: Counter[tuple[str, str]] = Counter()
    for family_rules in ruleset.families:
        for table in family_rules.tables:
            for hook in table.hooks:
                expected[(nftables.TABLE, f"{table.table}_{nftables._HOOK_OF[hook.builtin]}")] += 1
            for chain in table.chains:
                name = nftables.chain_name(table.table, family_rules.family, chain.name)
                expected[(nftables.TABLE, name)] += len(chain.rules)
    problems = []
    want_tables = [("inet", nftables.TABLE)] if ruleset.families else []
    if tables != want_tables:
        problems.append(f"tables {tables}, the plan has {want_tables}")
    if chains != set(expected):
        problems.append(f"chains differ: extra {chains - set(expected)}, missing {set(expected) - chains}")
    for key in set(rules) | set(expected):
        if rules[key] != expected[key]:
            problems.append(f"{key}: {rules[key]} rules, the plan has {expected[key]}")
    return problems
