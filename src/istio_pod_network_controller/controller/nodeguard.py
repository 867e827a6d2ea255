"""The alarm for our capture rules in the node's own network namespace: found, removed, reported.

Discovery never writes there (see dataplane/discovery.py), so finding our chains in the node's namespace
means a bug or an older controller did: the node's egress would be redirected to a proxy that is not
there, and the controller itself could lose the API server. The controller looks at start and at every
repair pass, in every namespace it can identify as the node's: PID 1's (when readable) and any namespace
holding the node's IP as the kubelet reports it in pods' `status.hostIPs`. What it finds it removes: our
chains, the jumps into them and our policy routes, nothing else of the node's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..dataplane.apply import sweep_node
from ..dataplane.discovery import pin_holding
from ..dataplane.netns import PinnedNetns
from ..errors import DataplaneError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Finding:
    """Rules of ours found (and removed) in one of the node's namespaces."""

    where: str
    lines: tuple[str, ...]


def node_namespaces(proc_root: str, host_ips: Iterable[str]) -> list[PinnedNetns]:
    """Every namespace identifiable as the node's, pinned, each once; the caller closes them."""
    handles: list[PinnedNetns] = []
    pid1 = os.path.join(proc_root, "1", "ns", "net")
    try:
        handles.append(PinnedNetns.open_path(pid1))
    except DataplaneError as exc:
        log.debug("node namespace %s not readable: %s", pid1, exc)
    handles += pin_holding(host_ips, proc_root)
    unique: list[PinnedNetns] = []
    for handle in handles:
        if any(handle.id == kept.id for kept in unique):
            handle.close()
        else:
            unique.append(handle)
    return unique


def sweep(proc_root: str, host_ips: Iterable[str]) -> list[Finding]:
    """Remove our rules from each of the node's namespaces; what was found. Blocking (tools, /proc)."""
    findings = []
    for handle in node_namespaces(proc_root, host_ips):
        with handle:
            try:
                lines = sweep_node(handle)
            except (DataplaneError, OSError) as exc:
                log.warning("could not check %s for capture rules: %s", handle.description, exc)
                continue
            if lines:
                findings.append(Finding(f"{handle.description} {handle.id}", tuple(lines)))
    return findings
