"""What an app with NET_ADMIN in its own network namespace can do to the kernel's tables, done the way it
would: raw netlink (names nft's own parser refuses) and the rule tools. A test helper."""

from __future__ import annotations

import socket
import struct
import subprocess

from ipnc_lab.sim.netns import NamedNetns

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWTABLE, NFT_MSG_NEWCHAIN = 0, 3
NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 1, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NFPROTO_INET = 1
WEIRD = b"\xff\xfe"
"""Not UTF-8: what an attacker names things to break a parser that decodes strictly."""


def _attr(kind: int, value: bytes) -> bytes:
    body = struct.pack("HH", 4 + len(value), kind) + value
    return body + b"\0" * (-len(body) % 4)


def _msg(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes = b"") -> bytes:
    payload = struct.pack("BBH", family, 0, socket.htons(res_id)) + attrs
    return struct.pack("IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def _batch(*messages: tuple[int, bytes]) -> None:
    """One nfnetlink batch of (message type, attributes) in this thread's namespace; raises on error."""
    parts = [_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, 0, NFNL_SUBSYS_NFTABLES)]
    for seq, (kind, attrs) in enumerate(messages, start=2):
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
        parts.append(_msg((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, NFPROTO_INET, 0, attrs))
    parts.append(_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, len(messages) + 2, 0, NFNL_SUBSYS_NFTABLES))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12) as sock:
        sock.settimeout(2)
        sock.send(b"".join(parts))
        for _ in messages:
            reply = sock.recv(65536)
            (error,) = struct.unpack_from("i", reply, 16)
            if error:
                raise OSError(-error, "nfnetlink batch refused")


def add_nft_table_and_chain(ns: NamedNetns, table: bytes, chain: bytes) -> None:
    """An inet table and a regular chain in it, with names given as raw bytes."""
    name = _attr(NFTA_TABLE_NAME, table + b"\0")
    chain_attrs = _attr(NFTA_CHAIN_TABLE, table + b"\0") + _attr(NFTA_CHAIN_NAME, chain + b"\0")
    ns.run(lambda: _batch((NFT_MSG_NEWTABLE, name), (NFT_MSG_NEWCHAIN, chain_attrs)))


def run(ns: NamedNetns, *argv: bytes | str) -> None:
    """A tool inside the pod's namespace with raw-byte arguments (an interface name that is not UTF-8)."""
    subprocess.run([b"ip", b"netns", b"exec", ns.name.encode(), *argv], check=True, capture_output=True)
