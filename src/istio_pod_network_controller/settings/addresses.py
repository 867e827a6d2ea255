"""The fixed addresses of Istio's capture, and the global-IPv6 test, for the data plane and the waiter alike.

Stdlib only, so the unprivileged waiter can import it without the rule or data-plane layers.
"""

from __future__ import annotations

import ipaddress
from typing import Final, Literal, TypeAlias

Family: TypeAlias = Literal[4, 6]
FAMILIES: Final[tuple[Family, Family]] = (4, 6)

LOOPBACK: Final[dict[Family, str]] = {4: "127.0.0.1", 6: "::1"}
"""Where the proxy's own listeners live; traffic to it is never captured."""
PASSTHROUGH: Final[dict[Family, str]] = {4: "127.0.0.6", 6: "::6"}
"""The source Envoy's inbound passthrough binds to (never captured), and the waiter's probe target."""
LOOPBACK_NET: Final[dict[Family, ipaddress.IPv4Network | ipaddress.IPv6Network]] = {
    family: ipaddress.ip_network(address) for family, address in LOOPBACK.items()
}
PASSTHROUGH_NET: Final[dict[Family, ipaddress.IPv4Network | ipaddress.IPv6Network]] = {
    family: ipaddress.ip_network(address) for family, address in PASSTHROUGH.items()
}
PASSTHROUGH_V6_HEX: Final = ipaddress.IPv6Address(PASSTHROUGH[6]).exploded.replace(":", "")
"""::6 as /proc/net/if_inet6 spells it."""

IF_INET6: Final = "/proc/thread-self/net/if_inet6"


def read_if_inet6(path: str = IF_INET6) -> list[list[str]]:
    """The rows of if_inet6 (address, index, prefix length, scope, flags, name); [] if unreadable."""
    try:  # interface names are the pod's to choose, any bytes: never a reason to fail
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return [line.split() for line in handle if line.strip()]
    except OSError:
        return []


def has_global_ipv6(rows: list[list[str]] | None = None) -> bool:
    """A global-scope IPv6 address outside lo: whether `ipv6: auto` captures IPv6 in this namespace."""
    rows = read_if_inet6() if rows is None else rows
    return any(len(f) == 6 and f[3] == "00" and f[5] != "lo" for f in rows)


def has_passthrough_v6(rows: list[list[str]] | None = None) -> bool:
    """::6 on lo, which the data plane adds when it captures IPv6."""
    rows = read_if_inet6() if rows is None else rows
    return any(len(f) == 6 and f[0] == PASSTHROUGH_V6_HEX and f[5] == "lo" for f in rows)
