"""TPROXY's policy routing, read over rtnetlink (dumps need no privileges): `fwmark M lookup T` + local route.

The controller installs the rule and `local default dev lo table T` after the packet rules, so a TPROXY pod
is only confirmed once these exist too. Stdlib only; the constants mirror rules/plan.py (a test checks).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Final

TPROXY_MARK: Final = 1337
TPROXY_ROUTE_TABLE: Final = 133

_NLMSG_DONE: Final = 3
_NLMSG_ERROR: Final = 2
_RTM_GETROUTE: Final = 26
_RTM_GETRULE: Final = 34
_NLM_F_REQUEST: Final = 0x1
_NLM_F_DUMP: Final = 0x300
_RTA_TABLE: Final = 15
_FRA_FWMARK: Final = 10
_FRA_TABLE: Final = 15
_RTN_LOCAL: Final = 2
_HEADER: Final = struct.Struct("=IHHII")
_AF: Final = {4: socket.AF_INET, 6: socket.AF_INET6}


def _dump(kind: int, family: int, timeout: float = 0.5) -> Iterator[bytes]:
    """Payloads (after nlmsghdr) of one rtnetlink dump."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        body = struct.pack("=BBBBBBBBI", _AF[family], 0, 0, 0, 0, 0, 0, 0, 0)  # rtmsg / fib_rule_hdr
        sock.send(_HEADER.pack(_HEADER.size + len(body), kind, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, msg_type, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    return
                if msg_type == _NLMSG_DONE:
                    return
                if msg_type == _NLMSG_ERROR:
                    raise OSError("rtnetlink dump failed")
                yield data[offset + _HEADER.size : offset + length]
                offset += (length + 3) & ~3


def _attrs(payload: bytes, start: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    offset = start
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return attrs


def _u32(raw: bytes | None) -> int | None:
    return struct.unpack("=I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def fwmark_rule_present(family: int, mark: int = TPROXY_MARK, table: int = TPROXY_ROUTE_TABLE) -> bool:
    for payload in _dump(_RTM_GETRULE, family):
        attrs = _attrs(payload, 12)
        rule_table = _u32(attrs.get(_FRA_TABLE)) or payload[4]
        if _u32(attrs.get(_FRA_FWMARK)) == mark and rule_table == table:
            return True
    return False


def local_default_route_present(family: int, table: int = TPROXY_ROUTE_TABLE) -> bool:
    for payload in _dump(_RTM_GETROUTE, family):
        dst_len, route_type = payload[1], payload[7]
        route_table = _u32(_attrs(payload, 12).get(_RTA_TABLE)) or payload[4]
        if route_table == table and dst_len == 0 and route_type == _RTN_LOCAL:
            return True
    return False


def tproxy_routing_missing(family: int) -> str:
    """'' when both are in place, else what is missing (an unreadable dump counts as missing)."""
    try:
        if not fwmark_rule_present(family):
            return f"policy rule 'fwmark {TPROXY_MARK} lookup {TPROXY_ROUTE_TABLE}' is missing"
        if not local_default_route_present(family):
            return f"route 'local default dev lo table {TPROXY_ROUTE_TABLE}' is missing"
    except OSError as exc:
        return f"cannot read policy routing: {exc}"
    return ""
