"""The proof that a pod's IPv6 is blocked (not captured): a datagram to a link-local neighbour is refused
before it leaves.

The controller's `ISTIO_BLOCK_OUTBOUND` chain rejects new outbound IPv6 UDP, so the waiter's send() fails
with EPERM inside the pod; without the rule the datagram leaves (to fe80::1 on the pod's own link, on the
probe port: nothing of the pod's neighbours is reached through a rule). No peer can produce EPERM, so the
errno alone proves the refusal happened in this pod's own rules. A pod without any IPv6 address outside lo
has no IPv6 way out to block.
"""

from __future__ import annotations

import errno
import socket
from typing import Final

from ..settings.addresses import read_if_inet6
from .probe import Outcome
from .probeplan import ProbeTarget

LINK_SCOPE: Final = "20"
"""if_inet6's scope column for a link-local address."""
NEIGHBOURS: Final = ("fe80::1", "fe80::2")
"""Candidate neighbours to dial; the first that is not the pod's own address."""
PAYLOAD: Final = b"istio-pod-network-wait ipv6 block probe"


def _own(rows: list[list[str]]) -> set[str]:
    return {str(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(r[0]))) for r in rows if len(r[0]) == 32}


class BlockedProbe:
    """IPv6 not captured: proven once a datagram to a link-local neighbour is refused with EPERM."""

    def __init__(self, target: ProbeTarget) -> None:
        self.target = target
        self.label = "IPv6 block"

    def describe(self) -> str:
        return (
            f"{self.label}: send a UDP datagram to a link-local neighbour (fe80::1 on the pod's first "
            f"interface with IPv6) port {self.target.port}, expect it refused inside the pod (EPERM)"
        )

    def close(self) -> None:
        pass

    def attempt(self) -> Outcome:
        rows = [r for r in read_if_inet6() if len(r) == 6 and r[5] != "lo"]
        if not rows:
            return Outcome(True, f"{self.label} no IPv6", f"{self.label}: no IPv6 address outside lo")
        links = [r for r in rows if r[3] == LINK_SCOPE]
        if not links:
            return Outcome(False, f"{self.label} no link-local", f"{self.label}: no link-local address yet")
        own = _own(rows)
        neighbour = next(a for a in NEIGHBOURS if a not in own)
        index, name = int(links[0][1], 16), links[0][5]
        where = f"[{neighbour}%{name}]:{self.target.port}"
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect((neighbour, self.target.port, 0, index))
                sock.send(PAYLOAD)
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    return Outcome(True, f"{self.label} refused", f"{self.label}: {where} refused (EPERM)")
                code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                return Outcome(False, f"{self.label} {code}", f"{self.label}: {where}: {code}")
        return Outcome(
            False,
            f"{self.label} open",
            f"{self.label}: a datagram to {where} left the pod: not blocked (yet)",
        )
