"""Exit codes of the operator commands (`run`, `check`, `status`, `rules`): one per class of mistake.

The waiter has its own table (waiter/exitcodes.py): it runs in mesh pods and its codes are part of the pod's
contract. These are for people and scripts at a terminal; each failure also prints one line saying what to do.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
DRIFT: Final = 1
"""`rules verify`: our rules are installed but differ from the pod's spec (a diff follows)."""
USAGE: Final = 2
"""Invalid command line or flag/environment/annotation value (click's own usage errors use 2 as well)."""
CONFIG: Final = 3
"""No usable cluster configuration: kubeconfig missing or invalid, not in a cluster."""
UNREACHABLE: Final = 4
"""The API server named by the configuration does not answer."""
DENIED: Final = 5
"""The API server answered 401/403: credentials or RBAC."""
PERMISSION: Final = 6
"""This process lacks a privilege it needs (a capability, root)."""
NOT_FOUND: Final = 7
"""The pod, network namespace or /proc root named does not exist."""
NOT_INSTALLED: Final = 8
"""`rules verify`: none of our rules are in the namespace."""
PREFLIGHT: Final = 9
"""`check`: at least one preflight check failed."""
DATAPLANE: Final = 10
"""A rule tool or the kernel refused a change for another reason (the line says which)."""

TABLE: Final = (
    (OK, "success"),
    (DRIFT, "rules verify: installed rules differ from the spec"),
    (USAGE, "invalid flags or flag/environment/annotation values"),
    (CONFIG, "no usable kubeconfig / not in a cluster"),
    (UNREACHABLE, "API server unreachable"),
    (DENIED, "API server refused the credentials or the request (401/403)"),
    (PERMISSION, "missing privilege (capability or root)"),
    (NOT_FOUND, "pod, network namespace or /proc root not found"),
    (NOT_INSTALLED, "rules verify: no rules of ours installed"),
    (PREFLIGHT, "check: a preflight check failed"),
    (DATAPLANE, "a rule tool or the kernel refused the change"),
)


def describe() -> str:
    """One line per code, for --help epilogs."""
    return "\n".join(f"{code:>4}  {text}" for code, text in TABLE)
