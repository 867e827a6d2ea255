"""Minimal in-process netlink dumps: policy-routing rules, routes, nftables tables, chains and rules
(stdlib only).

Every apply must know whether our TPROXY `fwmark` rules exist and which rule systems hold tables in the
namespace, and the waiter must see TPROXY's policy routing before it confirms a pod. Asking `ip rule show` or
`nft list tables` costs a process spawn each (2-3 ms, more than the rule load itself); a netlink dump costs
microseconds and needs no privilege. Sockets belong to the namespace of the thread that creates them (see
dataplane.netns.run_in).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NETLINK_NETFILTER = 12
RTM_GETROUTE = 26
RTM_GETRULE = 34
RTA_TABLE = 15
RTN_LOCAL = 2
FRA_FWMARK = 10
FRA_TABLE = 15
DUMP_TIMEOUT = 2.0
NFT_MSG_GETTABLE = (10 << 8) | 1  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE
NFT_MSG_GETCHAIN = (10 << 8) | 4
NFT_MSG_GETRULE = (10 << 8) | 7
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_TYPE = 1, 3, 4, 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM, NFTA_EXPR_NAME = 1, 1
_EVERY_FAMILY = struct.pack("BBH", socket.AF_UNSPEC, 0, 0)  # struct nfgenmsg of a dump of every family
NF_HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}
_NFPROTO = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
_FAMILY: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}


def _attributes(data: bytes) -> dict[int, bytes]:
    attrs = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        if length < 4:
            break
        attrs[kind & 0x7FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return attrs


def _dump(protocol: int, msg_type: int, header: bytes) -> Iterator[tuple[bytes, dict[int, bytes]]]:
    """Yield (fixed header, attributes) of every message of one NLM_F_DUMP request."""
    request = struct.pack("IHHII", 16 + len(header), msg_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + header
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol) as sock:
        sock.settimeout(DUMP_TIMEOUT)
        sock.send(request)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("IHHII", data, offset)
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("i", data, offset + 16)
                    if errno == 0:
                        return
                    raise OSError(-errno, f"netlink dump of message type {msg_type} failed")
                body = data[offset + 16 : offset + length]
                yield body[: len(header)], _attributes(body[len(header) :])
                offset += (length + 3) & ~3


@dataclass(frozen=True, slots=True)
class FibRule:
    family: int
    fwmark: int | None
    table: int


def fib_rules() -> list[FibRule]:
    """Every IPv4 and IPv6 policy rule of the current thread's network namespace."""
    rules = []
    header = struct.pack("BBBBBBBBI", socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
    for fixed, attrs in _dump(socket.NETLINK_ROUTE, RTM_GETRULE, header):
        family, table = fixed[0], fixed[4]
        if family in _FAMILY:
            mark = struct.unpack("I", attrs[FRA_FWMARK])[0] if FRA_FWMARK in attrs else None
            full_table = struct.unpack("I", attrs[FRA_TABLE])[0] if FRA_TABLE in attrs else table
            rules.append(FibRule(_FAMILY[family], mark, full_table))
    return rules


def local_default_route_families(table: int) -> set[int]:
    """IP versions (4, 6) whose route table `table` holds `local default` (TPROXY's route to lo)."""
    families = set()
    header = struct.pack("BBBBBBBBI", socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)  # struct rtmsg
    for fixed, attrs in _dump(socket.NETLINK_ROUTE, RTM_GETROUTE, header):
        family, dst_len, route_table, route_type = fixed[0], fixed[1], fixed[4], fixed[7]
        if RTA_TABLE in attrs:
            route_table = struct.unpack("I", attrs[RTA_TABLE])[0]
        if family in _FAMILY and route_table == table and dst_len == 0 and route_type == RTN_LOCAL:
            families.add(_FAMILY[family])
    return families


def _name(raw: bytes) -> str:
    """A kernel-held name (any bytes a NET_ADMIN app chose): surrogateescape keeps foreign names distinct."""
    return raw.rstrip(b"\0").decode(errors="surrogateescape")


@dataclass(frozen=True, slots=True)
class NftChain:
    family: str
    table: str
    name: str
    hook: str | None
    """Base chains only: prerouting, input, forward, output, postrouting (or the number)."""
    priority: int | None
    type: str


def nft_chains() -> list[NftChain]:
    """Every nftables chain of the current thread's namespace, with the hook and priority of base chains.

    Read over netlink, not with `nft -j`: nft's JSON output aborts on a name that is not UTF-8.
    """
    chains = []
    for fixed, attrs in _dump(NETLINK_NETFILTER, NFT_MSG_GETCHAIN, _EVERY_FAMILY):
        hook = priority = None
        if NFTA_CHAIN_HOOK in attrs:
            nested = _attributes(attrs[NFTA_CHAIN_HOOK])
            if NFTA_HOOK_HOOKNUM in nested:
                number = struct.unpack(">I", nested[NFTA_HOOK_HOOKNUM][:4])[0]
                hook = NF_HOOKS.get(number, str(number))
            if NFTA_HOOK_PRIORITY in nested:
                priority = struct.unpack(">i", nested[NFTA_HOOK_PRIORITY][:4])[0]
        chains.append(
            NftChain(
                _NFPROTO.get(fixed[0], str(fixed[0])),
                _name(attrs.get(NFTA_CHAIN_TABLE, b"")),
                _name(attrs.get(NFTA_CHAIN_NAME, b"")),
                hook,
                priority,
                _name(attrs.get(NFTA_CHAIN_TYPE, b"")),
            )
        )
    return chains


def nft_rule_expressions() -> dict[tuple[str, str, str], list[frozenset[str]]]:
    """(family, table, chain) -> the expression names of each of its rules (`nat`, `notrack`, `ct`, ...)."""
    rules: dict[tuple[str, str, str], list[frozenset[str]]] = {}
    for fixed, attrs in _dump(NETLINK_NETFILTER, NFT_MSG_GETRULE, _EVERY_FAMILY):
        key = (
            _NFPROTO.get(fixed[0], str(fixed[0])),
            _name(attrs.get(NFTA_RULE_TABLE, b"")),
            _name(attrs.get(NFTA_RULE_CHAIN, b"")),
        )
        names = frozenset(
            _name(_attributes(element).get(NFTA_EXPR_NAME, b""))
            for kind, element in _elements(attrs.get(NFTA_RULE_EXPRESSIONS, b""))
            if kind == NFTA_LIST_ELEM
        )
        rules.setdefault(key, []).append(names)
    return rules


def _elements(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The attributes of a nested list, in order (repeated kinds kept, unlike _attributes)."""
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        if length < 4:
            return
        yield kind & 0x7FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def nft_tables() -> list[tuple[str, str]]:
    """(family, name) of every nftables table, iptables-nft's included, of the current thread's namespace.

    Names are hostile input (an app with NET_ADMIN names its tables with any bytes): see _name.
    """
    header = struct.pack("BBH", socket.AF_UNSPEC, 0, 0)
    return [
        (_NFPROTO.get(fixed[0], str(fixed[0])), _name(attrs[NFTA_TABLE_NAME]))
        for fixed, attrs in _dump(NETLINK_NETFILTER, NFT_MSG_GETTABLE, header)
        if NFTA_TABLE_NAME in attrs
    ]
