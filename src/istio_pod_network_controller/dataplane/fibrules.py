"""List policy-routing rules over rtnetlink in-process.

Every apply must know whether our TPROXY `fwmark` rules exist; asking `ip -4/-6 rule show` costs two process
spawns per pod, while one RTM_GETRULE dump for all families on a netlink socket costs microseconds. Run it
on a thread inside the target namespace: the socket belongs to the namespace it was created in.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

RTM_GETRULE = 34
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
FRA_FWMARK = 10
FRA_TABLE = 15
_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}


@dataclass(frozen=True, slots=True)
class FibRule:
    family: int
    fwmark: int | None
    table: int


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


def list_rules() -> list[FibRule]:
    """Every IPv4 and IPv6 policy rule of the current thread's network namespace."""
    request = struct.pack("IHHII", 16 + 12, RTM_GETRULE, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    request += struct.pack("BBBBBBBBI", socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
    rules: list[FibRule] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(request)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("IHHII", data, offset)
                if kind == NLMSG_DONE:
                    return rules
                if kind == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("i", data, offset + 16)
                    raise OSError(-errno, "RTM_GETRULE dump failed")
                family, _, _, _, table = struct.unpack_from("BBBBB", data, offset + 16)
                attrs = _attributes(data[offset + 28 : offset + length])
                if family in _FAMILY:
                    mark = struct.unpack("I", attrs[FRA_FWMARK])[0] if FRA_FWMARK in attrs else None
                    full_table = struct.unpack("I", attrs[FRA_TABLE])[0] if FRA_TABLE in attrs else table
                    rules.append(FibRule(_FAMILY[family], mark, full_table))
                offset += (length + 3) & ~3
