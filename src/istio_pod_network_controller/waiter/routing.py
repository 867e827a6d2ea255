"""TPROXY's policy routing, read over rtnetlink (dumps need no privileges): `fwmark M lookup T` + local route.

The controller installs the rule and `local default dev lo table T` after the packet rules, so a TPROXY pod
is only confirmed once these exist too.
"""

from __future__ import annotations

from ..netlink import fib_rules, local_default_route_families
from ..settings.spec import TPROXY_MARK, TPROXY_ROUTE_TABLE


def tproxy_routing_missing(family: int) -> str:
    """'' when both are in place, else what is missing (an unreadable dump counts as missing)."""
    try:
        rules = fib_rules()
        if not any((r.family, r.fwmark, r.table) == (family, TPROXY_MARK, TPROXY_ROUTE_TABLE) for r in rules):
            return f"policy rule 'fwmark {TPROXY_MARK} lookup {TPROXY_ROUTE_TABLE}' is missing"
        if family not in local_default_route_families(TPROXY_ROUTE_TABLE):
            return f"route 'local default dev lo table {TPROXY_ROUTE_TABLE}' is missing"
    except OSError as exc:
        return f"cannot read policy routing: {exc}"
    return ""
