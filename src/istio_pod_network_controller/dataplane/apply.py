"""apply / verify / clean: the data plane's public entry points, one pinned namespace at a time.

Each call refuses the node's own namespace, then does all its work on one thread inside the target
namespace: resolve the IPv6 policy from the pod's addresses, choose the backend, render, and run the tools.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from .. import netlink
from ..rules import nftables, plan
from ..rules.model import Ruleset
from ..settings.addresses import PASSTHROUGH, has_global_ipv6, has_passthrough_v6
from ..settings.spec import InterceptSpec, IPv6Policy
from . import netns as ns_mod
from . import resolvconf
from .backends import BACKENDS, BackendName, make, route_drift, sync_routes
from .netns import NetnsId, PinnedNetns
from .tools import run

BackendChoice: TypeAlias = Literal["auto", "legacy", "nft", "nftables"]
BACKEND_CHOICES: tuple[BackendChoice, ...] = ("auto", "legacy", "nft", "nftables")
ALL_ROUTES = tuple(plan.TPROXY_ROUTES.values())


@dataclass(frozen=True, slots=True)
class ApplyResult:
    backend: BackendName
    netns: NetnsId
    fingerprint: str
    ipv6_captured: bool
    seconds: float


@dataclass(frozen=True, slots=True)
class Drift:
    backend: BackendName
    lines: tuple[str, ...]

    @property
    def in_place(self) -> bool:
        return not self.lines

    @property
    def report(self) -> str:
        return "\n".join(self.lines) if self.lines else "in place"


@dataclass(frozen=True, slots=True)
class Footprints:
    """Which rule systems already hold tables in the namespace (read cheaply, without a full save)."""

    legacy: bool
    iptables_nft: bool
    ours_nftables: bool

    def holds(self, backend: BackendName) -> bool:
        return {"legacy": self.legacy, "nft": self.iptables_nft, "nftables": self.ours_nftables}[backend]


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def _footprints() -> Footprints:
    names = ("ip_tables_names", "ip6_tables_names")
    legacy = any(_read(f"/proc/thread-self/net/{name}").strip() for name in names)
    tables = netlink.nft_tables()
    iptables_nft = any(family in {"ip", "ip6"} for family, _ in tables)
    ours = ("inet", nftables.TABLE) in tables
    return Footprints(legacy, iptables_nft, ours)


@functools.lru_cache(maxsize=4)
def host_backend(proc_root: str = "/proc") -> BackendName:
    """The node's choice, as Istio makes it: legacy when the host already has legacy tables, else nft."""
    for pid in ("1", "self"):
        if _read(os.path.join(proc_root, pid, "net", "ip_tables_names")).strip():
            return "legacy"
    return "nft"


def _choose(choice: BackendChoice, found: Footprints, proc_root: str) -> BackendName:
    """`auto`: keep whatever the pod's namespace already uses, else follow the node."""
    if choice != "auto":
        return choice
    preference: tuple[BackendName, ...] = ("legacy", "nftables", "nft")
    for name in preference:
        if found.holds(name):
            return name
    return host_backend(proc_root)


def _sync_passthrough_v6(wanted: bool) -> None:
    """::6 on lo: the IPv6 source Envoy's inbound passthrough binds to (IPv4 has all of 127/8 on lo)."""
    present = has_passthrough_v6()
    if wanted and not present:
        run(["ip", "-6", "addr", "add", f"{PASSTHROUGH[6]}/128", "dev", "lo", "nodad"])
    elif present and not wanted:
        run(["ip", "-6", "addr", "del", f"{PASSTHROUGH[6]}/128", "dev", "lo"])


@dataclass(frozen=True, slots=True)
class _Decision:
    """What apply and verify settle first, inside the namespace: the spec's IPv6 policy, rules, backend."""

    spec: InterceptSpec
    ruleset: Ruleset
    found: Footprints
    backend: BackendName

    def other_backends(self) -> list[BackendName]:
        """The other backends that hold tables here, and so may hold a stale copy of our rules."""
        return [b for b in BACKENDS if b != self.backend and self.found.holds(b)]


def with_nameservers(
    spec: InterceptSpec, netns: PinnedNetns, pod_pids: Iterable[int], proc_root: str
) -> InterceptSpec:
    """Limit DNS capture to the pod's resolv.conf nameservers, as Istio's sidecar (unless capture-all)."""
    if not spec.capture_dns or spec.capture_all_dns or spec.dns_servers is not None:
        return spec
    return spec.with_dns_servers(resolvconf.pod_nameservers(pod_pids, netns.id, proc_root))


def _decide(spec: InterceptSpec, backend: BackendChoice, proc_root: str) -> _Decision:
    resolved = spec.with_ipv6(has_global_ipv6()) if spec.ipv6 is IPv6Policy.AUTO else spec
    found = _footprints()
    return _Decision(resolved, plan.build(resolved), found, _choose(backend, found, proc_root))


def apply(
    netns: PinnedNetns,
    spec: InterceptSpec,
    backend: BackendChoice = "auto",
    *,
    allow_host: bool = False,
    proc_root: str = "/proc",
    pod_pids: Iterable[int] = (),
) -> ApplyResult:
    """Make our rules in `netns` exactly those of `spec`; repeatable, and foreign rules stay untouched.

    Copies of our rules left by another backend (say, a change from legacy to nft) are removed, so a pod
    never holds two captures at once. A spec with interceptionMode NONE removes everything of ours.
    `pod_pids`: the pod's processes, whose resolv.conf gives the nameservers DNS capture is limited to.
    """
    ns_mod.refuse_host(netns, proc_root, allow_host=allow_host)
    spec = with_nameservers(spec, netns, pod_pids, proc_root)
    started = time.perf_counter()

    def work() -> ApplyResult:
        decided = _decide(spec, backend, proc_root)
        make(decided.backend).apply(decided.ruleset, present=decided.found.holds(decided.backend))
        for other in decided.other_backends():
            make(other).clean()
        sync_routes(decided.ruleset.routes, all_ours=ALL_ROUTES)
        captured_v6 = decided.spec.ipv6 is IPv6Policy.CAPTURE
        _sync_passthrough_v6(decided.spec.intercepts and captured_v6)
        return ApplyResult(
            decided.backend,
            netns.id,
            decided.spec.fingerprint(),
            captured_v6,
            time.perf_counter() - started,
        )

    return ns_mod.run_in(netns, work)


def verify(
    netns: PinnedNetns,
    spec: InterceptSpec,
    backend: BackendChoice = "auto",
    *,
    allow_host: bool = False,
    proc_root: str = "/proc",
    pod_pids: Iterable[int] = (),
) -> Drift:
    """Compare the live rules with what `spec` renders to; any missing, extra or changed rule is drift."""
    ns_mod.refuse_host(netns, proc_root, allow_host=allow_host)
    spec = with_nameservers(spec, netns, pod_pids, proc_root)

    def work() -> Drift:
        decided = _decide(spec, backend, proc_root)
        lines = make(decided.backend).drift(decided.ruleset)
        empty = Ruleset((), ())
        for other in decided.other_backends():
            lines += [f"{other}: {line}" for line in make(other).drift(empty)]
        lines += route_drift(decided.ruleset.routes, all_ours=ALL_ROUTES)
        return Drift(decided.backend, tuple(lines))

    return ns_mod.run_in(netns, work)


def clean(
    netns: PinnedNetns,
    backend: BackendChoice = "auto",
    *,
    allow_host: bool = False,
    proc_root: str = "/proc",
) -> list[BackendName]:
    """Remove every rule and route of ours (from every backend that holds tables, for `auto`)."""
    ns_mod.refuse_host(netns, proc_root, allow_host=allow_host)

    def work() -> list[BackendName]:
        found = _footprints()
        names = [b for b in BACKENDS if found.holds(b)] if backend == "auto" else [backend]
        for name in names:
            make(name).clean()
        sync_routes((), all_ours=ALL_ROUTES, flush=True)
        _sync_passthrough_v6(False)
        return names

    return ns_mod.run_in(netns, work)


def sweep_node(netns: PinnedNetns) -> list[str]:
    """Find our chains, jumps and policy routes in the node's own namespace and remove exactly those.

    Returns what was found (empty: nothing of ours). Everything else of the node's stays: each backend
    removes only its own chains and the jumps into them; policy rules go only where they carry our mark.
    The one writer that may enter the node's namespace, so it takes no refuse_host check.
    """

    def work() -> list[str]:
        found = _footprints()
        lines: list[str] = []
        empty = Ruleset((), ())
        for name in BACKENDS:
            if found.holds(name):
                ours = make(name).drift(empty)
                lines += [f"{name}: {line}" for line in ours]
                if ours:
                    make(name).clean()
        routes = route_drift((), all_ours=ALL_ROUTES)
        if routes:
            sync_routes((), all_ours=ALL_ROUTES)
        return lines + routes

    return ns_mod.run_in(netns, work)
