"""The last check on rendered rule text before it can reach a tool: every line and token has a shape the
renderers produce from typed values, or the renderer has a bug and nothing is loaded.

Parsing already reduces every setting to numbers, scope-free networks and kernel-valid interface names, so
these checks cannot fail for any input; they exist so that a future renderer change which lets a string
through (a `%scope`, a newline, a quote) raises RenderInvariantError instead of becoming a rule.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Final

from ..errors import RenderInvariantError, escaped

_IPT_TOKEN: Final = re.compile(r"[A-Za-z0-9_.:/,@+!-]+")
"""Characters of an iptables-restore word we render: names, numbers, CIDRs, 0x marks, `!`."""
_IPT_OPTIONS: Final = frozenset(
    {"-p", "-s", "-d", "-i", "-o", "-m", "-j", "--dport", "--sport", "--uid-owner", "--gid-owner",
     "--ctstate", "--to-ports", "--on-port", "--tproxy-mark", "--set-xmark", "--zone", "--reject-with",
     "--mark", "--dports"}
)  # fmt: skip
"""Every option the renderer writes with a value; each takes exactly one, never starting with `-` or `!`."""
_IPT_FLAGS: Final = frozenset({"--save-mark", "--restore-mark"})
"""The options the renderer writes without a value (CONNMARK's two directions)."""
_IPT_CHAIN: Final = re.compile(r"[A-Z][A-Z0-9_]{0,28}")
_IPT_DECLARATION: Final = re.compile(r":([A-Z][A-Z0-9_]{0,28}) - \[0:0\]")
_IPT_VERBS: Final = frozenset({"-A", "-I", "-D", "-X"})

_NFT_WORD: Final = re.compile(r"[A-Za-z0-9_.:/,=!][A-Za-z0-9_.:/,=!-]*")
_NFT_SET_PORT: Final = re.compile(r"[0-9]{1,5},?")
_NFT_QUOTED_IFNAME: Final = re.compile(r'"[A-Za-z0-9_.@][A-Za-z0-9_.@-]{0,14}"')
_NFT_CHAIN: Final = re.compile(r"[a-z]+[46]?_[A-Za-z0-9_]+")
_NFT_BASE_HEADER: Final = re.compile(
    r"type (filter|nat|route) hook (prerouting|output|input) priority (raw|mangle|dstnat|filter|-100); "
    r"policy accept;"
)
_NFT_KEYWORDS_NEVER_IN_A_RULE: Final = frozenset(
    {"include", "define", "table", "chain", "map", "flowtable", "delete", "flush", "add", "insert",
     "replace", "create", "destroy", "list", "rename", "COMMIT"}
)  # fmt: skip
"""Words that start a command or a block in nft's language; never part of a rule we render (`reset` is left
out: `reject with tcp reset` is ours, and a rule line can never start a new command anyway)."""


def _refuse(kind: str, line: str, why: str) -> RenderInvariantError:
    return RenderInvariantError(f"{kind} renderer produced {why}: {escaped(line, 300)}")


def _printable_ascii(kind: str, text: str) -> None:
    for line in text.split("\n"):
        if not (line.isascii() and line.replace("\t", "").isprintable()):
            raise _refuse(kind, line, "a control or non-ASCII character")


def writable_chain(name: str) -> bool:
    """Whether a live chain's name can be written back into restore input (upper-case iptables style)."""
    return _IPT_CHAIN.fullmatch(name) is not None


def echoable(text: str) -> bool:
    """Whether a live rule's saved text can be echoed back (`-D CHAIN text`) as printable ASCII."""
    return text.isascii() and text.isprintable()


def check_words(words: list[str]) -> list[str]:
    """Refuse an iptables rule's words before they are joined: once joined, `net1 -j ACCEPT` as one
    interface name would read as three well-formed words. Returns `words` unchanged."""
    for word in words:
        if not _IPT_TOKEN.fullmatch(word):
            raise _refuse("iptables", " ".join(words), f"the word {escaped(word, 40, quotes=True)!r}")
    return words


def check_restore(text: str, tables: Collection[str]) -> str:
    """Refuse iptables-restore input that is not made of our line shapes; return `text` unchanged.

    `tables`: the table names the plan (or the transaction) produces; any other `*table` header, a
    `COMMIT` that does not close exactly one of them, or a token in the wrong place is a renderer bug.
    """
    _printable_ascii("iptables", text)
    if "\t" in text:
        raise _refuse("iptables", text, "a tab")
    open_table: str | None = None
    seen: set[str] = set()
    for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
        if line.startswith("*"):
            name = line[1:]
            if open_table is not None or name not in tables or name in seen:
                raise _refuse("iptables", line, "a table header the plan did not produce")
            open_table = name
            seen.add(name)
        elif line == "COMMIT":
            if open_table is None:
                raise _refuse("iptables", line, "a COMMIT outside a table")
            open_table = None
        elif open_table is None:
            raise _refuse("iptables", line, "a line outside a table")
        elif line.startswith(":"):
            if not _IPT_DECLARATION.fullmatch(line):
                raise _refuse("iptables", line, "a malformed chain declaration")
        else:
            _check_restore_rule(line)
    if open_table is not None:
        raise _refuse("iptables", open_table, "a table without COMMIT")
    return text


def _check_restore_rule(line: str) -> None:
    words = line.split(" ")
    verb, chain, *rest = [*words, "", ""][: max(len(words), 2)]
    if verb not in _IPT_VERBS or not _IPT_CHAIN.fullmatch(chain):
        raise _refuse("iptables", line, "a line that is not -A/-I/-D/-X on a chain name")
    if verb == "-I" and rest:
        if not rest[0].isdigit():
            raise _refuse("iptables", line, "an -I without a position")
        rest = rest[1:]
    if verb == "-D":
        return  # the exact text iptables-save printed for a live jump into our chains, echoed to delete it
    for word in rest:  # `COMMIT` or `*table` mean something to iptables-restore only as a whole line
        if not _IPT_TOKEN.fullmatch(word):
            raise _refuse("iptables", line, f"the token {escaped(word, 40)!r}")
    index = 0
    while index < len(rest):  # the words are (`!`) option value pairs, nothing else
        word = rest[index]
        if word == "!":
            if index + 1 == len(rest) or rest[index + 1] not in _IPT_OPTIONS:
                raise _refuse("iptables", line, "a `!` that negates no option")
            index += 1
            continue
        if word in _IPT_FLAGS:
            index += 1
            continue
        if word not in _IPT_OPTIONS:
            raise _refuse("iptables", line, f"{escaped(word, 40)!r} where an option of ours belongs")
        value = rest[index + 1] if index + 1 < len(rest) else ""
        if not value or value.startswith("-") or value == "!":
            raise _refuse("iptables", line, f"{word} without its value")
        index += 2


def check_nft(text: str, table: str) -> str:
    """Refuse `nft -f` input that is not our one table of chains and rules; return `text` unchanged."""
    _printable_ascii("nftables", text)
    chains: set[str] = set()
    jumps: list[tuple[str, str]] = []
    depth = 0
    for line in text.split("\n"):
        if line in {f"table inet {table}", f"delete table inet {table}", ""} and depth == 0:
            continue
        if line == f"table inet {table} {{" and depth == 0:
            depth = 1
        elif line == "}" and depth == 1:
            depth = 0
        elif line.startswith("\tchain ") and line.endswith(" {") and depth == 1:
            name = line[len("\tchain ") : -2]
            if not _NFT_CHAIN.fullmatch(name) or name in chains:
                raise _refuse("nftables", line, "a chain name we never write")
            chains.add(name)
            depth = 2
        elif line == "\t}" and depth == 2:
            depth = 1
        elif line.startswith("\t\t") and depth == 2:
            rule = line[2:]
            if not _NFT_BASE_HEADER.fullmatch(rule):
                jumps += [(line, target) for target in _check_nft_rule(line, rule)]
        else:
            raise _refuse("nftables", line, "a line outside our table's grammar")
    if depth != 0:
        raise _refuse("nftables", text[-200:], "an unclosed block")
    for line, target in jumps:
        if target not in chains:
            raise _refuse("nftables", line, "a jump to a chain the plan did not produce")
    return text


def _check_nft_rule(line: str, rule: str) -> list[str]:
    """Check one rule's words; return the chains it jumps to."""
    words = rule.split(" ")
    targets = []
    in_set = False
    for index, word in enumerate(words):
        previous = words[index - 1] if index else ""
        if in_set:  # an anonymous set of ports, `{ 53, 15008 }`: numbers and commas only, then `}`
            if word == "}":
                in_set = False
            elif not _NFT_SET_PORT.fullmatch(word):
                raise _refuse("nftables", line, f"{escaped(word, 40)!r} inside a port set")
            continue
        if word == "{":
            before = words[index - 2] if previous == "!=" and index > 1 else previous
            if before != "dport":
                raise _refuse("nftables", line, "a set that is not a destination port set")
            in_set = True
            continue
        if word in _NFT_KEYWORDS_NEVER_IN_A_RULE:
            raise _refuse("nftables", line, f"the keyword {word!r} inside a rule")
        if previous in {"iifname", "oifname"}:
            if not _NFT_QUOTED_IFNAME.fullmatch(word):
                raise _refuse("nftables", line, f"an interface name we never write, {escaped(word, 40)!r}")
        elif not _NFT_WORD.fullmatch(word):
            raise _refuse("nftables", line, f"the token {escaped(word, 40)!r}")
        if previous in {"jump", "goto"}:
            targets.append(word)
    if in_set:
        raise _refuse("nftables", line, "an unclosed port set")
    return targets
