"""Preflight: what the node controller needs before it touches a pod, checked at `run` start and by `check`.

Decisions are pure functions of what the probes saw (so every verdict and its advice is unit-tested without
root); the probes below them read /proc/self/status, the /proc root, PATH and the API server. A failed check
names the fix in one line: it ends up in the log, in /readyz and in a Warning Event on the node.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..dataplane import procfs
from ..dataplane.apply import BackendChoice, host_backend
from .cpus import read_text
from .events import build_node_warning

CAPABILITIES: Final = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_PTRACE": 19, "SYS_ADMIN": 21}
"""The capabilities the controller uses, with their bit numbers (linux/capability.h)."""
CAPABILITY_USE: Final = {
    "NET_ADMIN": "change a pod's rules and routes",
    "NET_RAW": "iptables' raw sockets",
    "SYS_PTRACE": "open other processes' /proc/PID/ns/net",
    "SYS_ADMIN": "setns() into a pod's network namespace",
}
TOOLS: Final[Mapping[str, tuple[str, ...]]] = {
    "legacy": ("iptables-legacy-save", "iptables-legacy-restore", "ip6tables-legacy-save",
               "ip6tables-legacy-restore"),
    "nft": ("iptables-nft-save", "iptables-nft-restore", "ip6tables-nft-save", "ip6tables-nft-restore"),
    "nftables": ("nft",),
}  # fmt: skip
ALWAYS_NEEDED_TOOLS: Final = ("ip",)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.name}: {self.detail}"
        return f"FAIL  {self.name}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")

    def reason(self) -> str:
        """The one-line form for /readyz, logs and the node Event."""
        return f"{self.name}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True, slots=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if not check.ok)

    def reason(self) -> str:
        return "; ".join(check.reason() for check in self.failures)


# --- capabilities -------------------------------------------------------------------------------------------


def parse_capeff(status_text: str) -> int | None:
    """The CapEff bit mask of a /proc/PID/status text (None when absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split(":", 1)[1].strip(), 16)
            except ValueError:
                return None
    return None


def missing_capabilities(capeff: int, needed: Iterable[str] = CAPABILITIES) -> list[str]:
    return [name for name in needed if not capeff & (1 << CAPABILITIES[name])]


def decide_capabilities(capeff: int | None, needed: Sequence[str] = tuple(CAPABILITIES)) -> Check:
    if capeff is None:
        return Check("capabilities", False, "cannot read CapEff from /proc/self/status", "run on Linux")
    missing = missing_capabilities(capeff, needed)
    if not missing:
        return Check("capabilities", True, " ".join(needed))
    uses = ", ".join(f"{name} ({CAPABILITY_USE[name]})" for name in missing)
    return Check(
        "capabilities",
        False,
        f"missing {uses}",
        "run as root with securityContext.capabilities.add: [" + ", ".join(missing) + "] (the chart does)",
    )


def missing_privileges(needed: Sequence[str], capeff: int | None) -> str | None:
    """For one command run by hand: None, or a one-line permission error naming each missing capability."""
    missing = missing_capabilities(capeff or 0, needed)
    if not missing:
        return None
    uses = ", ".join(f"CAP_{name} ({CAPABILITY_USE[name]})" for name in missing)
    return (
        f"permission denied (EPERM): this needs {uses}; run it as root on the node or in the controller's pod"
    )


def probe_capeff(path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as handle:
            return parse_capeff(handle.read())
    except OSError:
        return None


# --- the node's /proc ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcView:
    """What a look at the /proc root found."""

    error: str | None = None
    processes: int = 0
    cgroups: int = 0
    """Distinct cgroups among the processes read."""
    own_cgroup_only: bool = False


def decide_proc(proc_root: str, view: ProcView) -> Check:
    name = f"/proc root {proc_root}"
    mount = "mount the node's /proc (hostPath /proc at /host/proc, --proc-root /host/proc) or set hostPID"
    if view.error is not None:
        return Check(name, False, view.error, mount)
    if view.processes == 0:
        return Check(name, False, "no processes: not a proc filesystem", mount)
    if view.own_cgroup_only:
        return Check(name, False, f"only this container's {view.processes} processes are visible", mount)
    return Check(name, True, f"{view.processes} processes in {view.cgroups} cgroups")


def probe_proc(proc_root: str, limit: int = 4096) -> ProcView:
    """Count processes and distinct cgroups under proc_root (at most `limit` processes are read)."""
    own = read_text("/proc/self/cgroup")
    try:
        entries = [entry for entry in os.listdir(proc_root) if entry.isdigit()]
    except FileNotFoundError:
        return ProcView(error="no such directory")
    except NotADirectoryError:
        return ProcView(error="not a directory")
    except PermissionError:
        return ProcView(error="permission denied")
    cgroups = {_read_cgroup(proc_root, int(pid)) for pid in entries[:limit]}
    cgroups.discard(None)
    only_own = own is not None and cgroups == {own}
    return ProcView(processes=len(entries), cgroups=len(cgroups), own_cgroup_only=only_own)


def _read_cgroup(proc_root: str, pid: int) -> str | None:
    try:
        data = procfs.read(proc_root, pid, "cgroup")
    except OSError:
        return None
    return None if data is None else data.decode("utf-8", "replace")


def proc_root_problem(proc_root: str) -> str | None:
    """For commands that only read /proc (find-netns): None, or why the root is unusable."""
    view = probe_proc(proc_root, limit=1)
    return view.error if view.error is not None else None if view.processes else "not a proc filesystem"


# --- rule tools ---------------------------------------------------------------------------------------------


def decide_tools(choice: BackendChoice, node_backend: str, present: Mapping[str, bool]) -> Check:
    """The tools of the backend pods will get (`auto`: the node's), plus `ip`; others are reported only."""
    wanted = node_backend if choice == "auto" else choice
    needed = [*ALWAYS_NEEDED_TOOLS, *TOOLS[wanted]]
    missing = [tool for tool in needed if not present.get(tool)]
    available = [name for name, tools in TOOLS.items() if all(present.get(t) for t in tools)]
    how = f"node uses {node_backend}" if choice == "auto" else f"--backend {choice}"
    if missing:
        return Check(
            "rule tools",
            False,
            f"{how}; missing {', '.join(missing)}",
            "use the project's image (it ships iptables legacy and nft, nftables, iproute2) or "
            "choose an installed backend with --backend",
        )
    return Check("rule tools", True, f"{how}; backends with tools: {', '.join(available)}")


def probe_tools() -> dict[str, bool]:
    names = {*ALWAYS_NEEDED_TOOLS, *(tool for tools in TOOLS.values() for tool in tools)}
    return {name: shutil.which(name) is not None for name in sorted(names)}


# --- API access ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Access:
    group: str
    resource: str
    verb: str
    allowed: bool | None = None

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}" + (f".{self.group}" if self.group else "")


def required_access(rules: Iterable[Mapping[str, Sequence[str]]]) -> tuple[Access, ...]:
    """Every (group, resource, verb) of ClusterRole-style rules."""
    return tuple(
        Access(group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    )


@dataclass(frozen=True, slots=True)
class ApiProblem:
    code: int
    """HTTP status; 0 when no answer arrived."""
    message: str


def decide_access(server: str, answers: Sequence[Access], problem: ApiProblem | None) -> Check:
    name = "API access"
    if problem is not None and problem.code == 0:
        return Check(
            name,
            False,
            f"cannot reach the API server {server}: {problem.message}",
            "check the server address in the kubeconfig, DNS and network policies towards it",
        )
    if problem is not None and problem.code == 401:
        return Check(
            name,
            False,
            f"the API server {server} refused the credentials (401)",
            "renew the token or client certificate in the kubeconfig / service account",
        )
    if problem is not None and problem.code in (403, 404):
        # Access reviews themselves refused or not served (a hardened or unusual API server): the server
        # answers, and a missing permission will show in the informers' errors; not a reason to stay unready.
        return Check(
            name, True, f"{server}: reachable; access reviews refused ({problem.code}), verbs not checked"
        )
    if problem is not None:
        return Check(name, False, f"the API server {server} answered {problem.code}: {problem.message}")
    denied = [str(a) for a in answers if not a.allowed]
    if denied:
        return Check(
            name,
            False,
            f"{server}: not allowed to {', '.join(denied)}",
            "apply the chart's ClusterRole and ClusterRoleBinding to this service account",
        )
    return Check(name, True, f"{server}: allowed to {', '.join(str(a) for a in answers)}")


# --- all together -------------------------------------------------------------------------------------------


def local_checks(proc_root: str, backend: BackendChoice, capeff: int | None = None) -> list[Check]:
    return [
        decide_capabilities(probe_capeff() if capeff is None else capeff),
        decide_proc(proc_root, probe_proc(proc_root)),
        decide_tools(backend, host_backend(proc_root), probe_tools()),
    ]


PREFLIGHT_FAILED: Final = "PreflightFailed"
"""Reason of the Warning Event on the node when a check fails."""


def node_event(node: str, message: str) -> dict[str, Any]:
    """The PreflightFailed Warning on the Node (`kubectl describe node` shows it)."""
    return build_node_warning(node, PREFLIGHT_FAILED, message)
