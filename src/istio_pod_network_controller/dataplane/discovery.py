"""Find a pod's network namespace from the node's /proc, by pod UID, and pin it.

The kubelet names every pod's cgroup after the pod UID, so /proc/PID/cgroup maps processes to pods without
asking the container runtime. A pod's containers all share the sandbox's network namespace; runtime helpers
such as CRI-O's conmon (host namespace) are ignored. A process of the pod may still make a namespace of its
own (`unshare -Urn` needs no privilege) and give it the pod's IP, so neither "the namespace holding the pod
IP" nor "the only namespace" identifies the sandbox. What does is time: the runtime creates the sandbox (its
pause process and namespace) before any container of the pod runs, so the sandbox's namespace is the one of
the pod's earliest-started process, a start time the kernel records and no later process can take back.
The pod IPs then only confirm that choice; other namespaces of the pod are reported, never chosen.
One scan of /proc indexes every pod on the node, so a burst of pod events costs one scan.

Parsing (cgroup text, fib_trie, if_inet6) is pure; the /proc I/O is kept in a few small functions.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import DataplaneError
from . import procfs
from .netns import NetnsId, PinnedNetns, host_netns_ids, pid_netns_id

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
# One line of /proc/PID/cgroup: "<hierarchy>:<controllers>:<path>" (v2: "0::<path>"). The pod segment is
# cgroupfs "/pod<uid>" or systemd "kubepods[-<qos>]-pod<uid_>.slice", somewhere below a kubepods root (kind
# nests it under /docker/<node>/...). The optional container segment names the runtime's container.
_CGROUP_LINE = re.compile(
    r"^[0-9]+:[^:\n]*:[^\n]*?[/-]kubepods\b[^\n]*?[/-]pod(?P<uid>" + _UID + r")(?:\.slice)?(?=/|$)"
    r"(?:/(?:(?P<conmon>crio-conmon-)|cri-containerd-|crio-|docker-)?(?P<cid>[0-9a-f]{64})"
    r"(?:\.scope)?(?=/|$))?",
    re.MULTILINE,
)
_CID_SCHEME = re.compile(r"^[a-z0-9-]+://")
_UNKNOWN_START = sys.maxsize


class PodNetnsNotFound(DataplaneError):
    """No network namespace can be attributed to the pod with confidence; the message says what was seen."""

    PUBLIC = "the pod's network namespace could not be found with confidence yet; see the controller's log"


class InvalidPodIP(DataplaneError):
    """A pod IP from the API that is not an IP address (the API server is not trusted to validate it)."""


@dataclass(frozen=True, slots=True)
class PodProcess:
    """A process found in a pod's cgroup; container_id is None when the cgroup names no container."""

    pid: int
    container_id: str | None


@dataclass(frozen=True, slots=True)
class PodNetns:
    """A pod's network namespace, pinned by fd; close `netns` when done."""

    pod_uid: str
    pid: int
    container_id: str | None
    netns: PinnedNetns
    matched_ips: tuple[str, ...]
    others: tuple[NetnsId, ...] = ()
    """Other namespaces (not the host's) that processes of the pod live in: not the sandbox, reported only."""

    def __enter__(self) -> PodNetns:
        return self

    def __exit__(self, *_: object) -> None:
        self.netns.close()


def normalize_uid(uid: str) -> str:
    """Systemd slices spell the UID with underscores; the API server with dashes."""
    return uid.strip().lower().replace("_", "-")


def normalize_container_id(container_id: str) -> str:
    """Pod status gives "containerd://<id>" (or cri-o://, docker://); cgroups give the bare id."""
    return _CID_SCHEME.sub("", container_id.strip().lower())


def parse_cgroup_line(line: str) -> tuple[str, str | None] | None:
    """(pod uid, container id or None) for a cgroup line inside a pod; None for non-pod and conmon lines."""
    match = _CGROUP_LINE.match(line.strip())
    if match is None or match["conmon"]:
        return None
    return normalize_uid(match["uid"]), match["cid"]


def parse_cgroup(text: str) -> tuple[str, str | None] | None:
    """The pod a process belongs to, from its whole /proc/PID/cgroup (v1 lists one line per hierarchy).

    A process whose lines name different pods is not attributed to any (it cannot be in two pods; guessing
    could pick the wrong namespace), and a conmon process is skipped even if some other line looks like a
    container.
    """
    uid: str | None = None
    cid: str | None = None
    for match in _CGROUP_LINE.finditer(text):
        if match["conmon"]:
            return None
        line_uid = normalize_uid(match["uid"])
        if uid is not None and line_uid != uid:
            return None
        uid = line_uid
        cid = cid or match["cid"]
    return None if uid is None else (uid, cid)


def parse_fib_trie_local(text: str) -> set[str]:
    """IPv4 addresses local to a namespace: the leaves of /proc/PID/net/fib_trie tagged "/32 host LOCAL"."""
    local: set[str] = set()
    leaf = ""
    for line in text.splitlines():
        entry = line.strip()
        if entry.startswith("|-- "):
            leaf = entry[4:]
        elif entry == "/32 host LOCAL" and leaf:
            local.add(leaf)
    return local


def parse_if_inet6(text: str) -> set[str]:
    """IPv6 addresses of a namespace from /proc/PID/net/if_inet6 (32 hex digits, then index, flags, name)."""
    return {
        str(ipaddress.IPv6Address(int(fields[0], 16)))
        for fields in (line.split() for line in text.splitlines())
        if fields and len(fields[0]) == 32
    }


def _pids(proc_root: str) -> Iterator[int]:
    with os.scandir(proc_root) as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def _netns_id(proc_root: str, pid: int) -> NetnsId | None:
    """None for vanished processes and zombies (whose ns links are already gone)."""
    try:
        return pid_netns_id(proc_root, pid)
    except OSError as exc:
        if exc.errno in (*procfs.VANISHED, errno.EACCES):
            return None
        raise


def parse_start_time(stat: str) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks after boot); the command name may hold ')'."""
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _start_time(proc_root: str, pid: int) -> int | None:
    data = procfs.read(proc_root, pid, "stat")
    return None if data is None else parse_start_time(data.decode("utf-8", "replace"))


def _pod_of(proc_root: str, pid: int) -> tuple[str, str | None] | None:
    data = procfs.read(proc_root, pid, "cgroup")
    if data is None or b"kubepods" not in data:
        return None
    return parse_cgroup(data.decode("utf-8", "replace"))


def _local_ips(proc_root: str, pid: int, expected: NetnsId) -> set[str] | None:
    """Addresses in pid's namespace, or None if the pid vanished or moved namespace while being read."""
    v4 = procfs.read(proc_root, pid, "net/fib_trie")
    v6 = procfs.read(proc_root, pid, "net/if_inet6")
    if v4 is None or _netns_id(proc_root, pid) != expected:
        return None
    return parse_fib_trie_local(v4.decode()) | parse_if_inet6((v6 or b"").decode())


class ProcIndex:
    """Pod UID -> processes, from one pass over /proc; serves any number of find() calls.

    The index is a snapshot: find() re-checks what it relies on (namespace identity, cgroup membership) so a
    process that exited or a PID that was reused since the scan is detected, not trusted.
    """

    def __init__(self, proc_root: str, pods: dict[str, list[PodProcess]], scanned: int) -> None:
        self.proc_root = proc_root
        self.pods = pods
        self.scanned = scanned
        self.host_ids = host_netns_ids(proc_root)

    @classmethod
    def scan(cls, proc_root: str = "/proc") -> ProcIndex:
        pods: dict[str, list[PodProcess]] = {}
        scanned = 0
        for pid in _pids(proc_root):
            scanned += 1
            found = _pod_of(proc_root, pid)
            if found is not None:
                pods.setdefault(found[0], []).append(PodProcess(pid, found[1]))
        return cls(proc_root, pods, scanned)

    def processes(self, pod_uid: str) -> tuple[PodProcess, ...]:
        return tuple(self.pods.get(normalize_uid(pod_uid), ()))

    def namespaces(self, pod_uid: str) -> dict[NetnsId, list[PodProcess]]:
        """The pod's live processes by namespace, read now (not at scan time); the host's are left out."""
        by_netns: dict[NetnsId, list[PodProcess]] = {}
        for proc in self.processes(pod_uid):
            ns = _netns_id(self.proc_root, proc.pid)
            if ns is not None and ns not in self.host_ids:
                by_netns.setdefault(ns, []).append(proc)
        return by_netns

    def find(
        self, pod_uid: str, *, container_ids: Iterable[str] = (), pod_ips: Iterable[str] = ()
    ) -> PodNetns:
        """Pin the pod's sandbox namespace: the one of its earliest-started process.

        container_ids (bare or "runtime://id") choose which of the sandbox's processes to pin through.
        pod_ips, when given, must include an address local to that namespace (else the sandbox is not the
        one the API describes yet). Raises PodNetnsNotFound, or InvalidPodIP for a malformed pod IP.
        """
        uid = normalize_uid(pod_uid)
        wanted = {normalize_container_id(c) for c in container_ids}
        ips = _parse_ips(uid, pod_ips)
        procs = sorted(self.processes(uid), key=lambda p: p.container_id not in wanted)
        if not procs:
            raise PodNetnsNotFound(
                f"pod {uid}: no process in a cgroup of this pod among {self.scanned} processes under "
                f"{self.proc_root} (pod not started yet, already gone, or proc root is not the node's)"
            )

        by_netns: dict[NetnsId, list[PodProcess]] = {}
        started: dict[NetnsId, int] = {}
        in_host: list[int] = []
        for proc in procs:
            ns = _netns_id(self.proc_root, proc.pid)
            if ns in self.host_ids:
                in_host.append(proc.pid)
            elif ns is not None:
                # An unreadable start time (the process is exiting) ranks after every readable one.
                start = _start_time(self.proc_root, proc.pid)
                start = _UNKNOWN_START if start is None else start
                by_netns.setdefault(ns, []).append(proc)
                started[ns] = min(start, started.get(ns, start))
        if not by_netns:
            gone = sorted({p.pid for p in procs} - set(in_host))
            raise PodNetnsNotFound(
                f"pod {uid}: found its processes but none in a pod network namespace: "
                f"in the host's (hostNetwork pod?): {in_host or 'none'}; exited: {gone or 'none'}"
            )

        first = min(started.values())
        earliest = [ns for ns, start in started.items() if start == first]
        if len(earliest) > 1:
            raise PodNetnsNotFound(
                f"pod {uid}: its earliest processes started in the same clock tick in "
                + ", ".join(f"{ns} (pids {[p.pid for p in by_netns[ns]]})" for ns in earliest)
                + "; refusing to guess which is the sandbox's"
            )
        (ns_id,) = earliest
        others = tuple(ns for ns in by_netns if ns != ns_id)
        matched: tuple[str, ...] = ()
        if ips:
            local = self._local(by_netns[ns_id], ns_id)
            if local is None:
                raise PodNetnsNotFound(f"pod {uid}: the processes of {ns_id} exited while it was read")
            matched = tuple(sorted(ips & local))
            if not matched:
                shown = sorted(a for a in local if not ipaddress.ip_address(a).is_loopback)
                raise PodNetnsNotFound(
                    f"pod {uid}: none of its IPs {sorted(ips)} is local to its sandbox's network namespace "
                    f"{ns_id} (has {shown}; a sandbox the API does not describe yet?)"
                )
        return self._pin(uid, ns_id, by_netns[ns_id], matched, others)

    def _local(self, procs: list[PodProcess], ns: NetnsId) -> set[str] | None:
        """The namespace's addresses, read through the first of its processes that is still there."""
        return next(
            (a for a in (_local_ips(self.proc_root, p.pid, ns) for p in procs) if a is not None), None
        )

    def _pin(
        self,
        uid: str,
        ns: NetnsId,
        procs: list[PodProcess],
        ips: tuple[str, ...],
        others: tuple[NetnsId, ...],
    ) -> PodNetns:
        """Open the namespace of the first process that is still this pod's, proven after the open.

        The fd is taken first and membership re-read second: a PID reused before the open then shows up as a
        foreign cgroup or namespace, and once the fd is open it pins the namespace whatever the PID becomes.
        """
        for proc in procs:
            try:
                pinned = PinnedNetns.open_pid(proc.pid, self.proc_root)
            except DataplaneError:
                continue
            still = _pod_of(self.proc_root, proc.pid)
            if pinned.id == ns and still is not None and still[0] == uid:
                pinned.description = f"pod {uid} pid {proc.pid} ({ns})"
                return PodNetns(uid, proc.pid, proc.container_id, pinned, ips, others)
            pinned.close()
        raise PodNetnsNotFound(
            f"pod {uid}: {ns} could not be pinned: its processes {[p.pid for p in procs]} exited, were "
            "replaced by other processes (PID reuse), or had no usable namespace link"
        )


def _parse_ips(uid: str, pod_ips: Iterable[str]) -> set[str]:
    """Canonical addresses; a scoped IPv6 address ("fe80::1%eth0") is no pod IP either."""
    parsed = set()
    for ip in pod_ips:
        try:
            address = ipaddress.ip_address(ip.strip())
        except ValueError:
            address = None
        if address is None or "%" in str(address):
            raise InvalidPodIP(f"pod {uid}: its status lists a pod IP that is not an IP address")
        parsed.add(str(address))
    return parsed


def find_pod_netns(
    pod_uid: str,
    container_ids: Iterable[str] = (),
    pod_ips: Iterable[str] = (),
    *,
    proc_root: str = "/proc",
    index: ProcIndex | None = None,
) -> PodNetns:
    """ProcIndex.find on `index`, or on a fresh scan of proc_root (an index carries its own proc root)."""
    return (index if index is not None else ProcIndex.scan(proc_root)).find(
        pod_uid, container_ids=container_ids, pod_ips=pod_ips
    )
