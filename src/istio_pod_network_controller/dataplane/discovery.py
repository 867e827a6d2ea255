"""Find a pod's network namespace from the node's /proc, by pod UID, and pin it.

The kubelet names every pod's cgroup after the pod UID, so /proc/PID/cgroup maps processes to pods without
asking the container runtime. A pod's containers all share the sandbox's network namespace; the only
processes of a pod that live elsewhere are runtime helpers such as CRI-O's conmon (host namespace), which
are ignored. One scan of /proc indexes every pod on the node, so a burst of pod events costs one scan.

Parsing (cgroup text, fib_trie, if_inet6) is pure; the /proc I/O is kept in a few small functions.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import DataplaneError
from .netns import NetnsId, PinnedNetns, host_netns_ids

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
_READ_CHUNK = 65536
_VANISHED = (errno.ENOENT, errno.ESRCH)


class PodNetnsNotFound(DataplaneError):
    """No network namespace can be attributed to the pod with confidence; the message says what was seen."""

    PUBLIC = "the pod's network namespace could not be found with confidence yet; see the controller's log"


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


def _read(path: str) -> bytes | None:
    """Whole small /proc file, or None when the process is gone (or is a kernel thread without it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _VANISHED:
            return None
        raise
    try:
        chunks = [os.read(fd, _READ_CHUNK)]
        while len(chunks[-1]) == _READ_CHUNK:
            chunks.append(os.read(fd, _READ_CHUNK))
    except OSError as exc:
        if exc.errno in _VANISHED:
            return None
        raise
    finally:
        os.close(fd)
    return b"".join(chunks)


def _pids(proc_root: str) -> Iterator[int]:
    with os.scandir(proc_root) as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def _netns_id(proc_root: str, pid: int) -> NetnsId | None:
    """None for vanished processes and zombies (whose ns links are already gone)."""
    try:
        info = os.stat(os.path.join(proc_root, str(pid), "ns", "net"))
    except OSError as exc:
        if exc.errno in (*_VANISHED, errno.EACCES):
            return None
        raise
    return NetnsId(info.st_dev, info.st_ino)


def _pod_of(proc_root: str, pid: int) -> tuple[str, str | None] | None:
    data = _read(os.path.join(proc_root, str(pid), "cgroup"))
    if data is None or b"kubepods" not in data:
        return None
    return parse_cgroup(data.decode("utf-8", "replace"))


def _local_ips(proc_root: str, pid: int, expected: NetnsId) -> set[str] | None:
    """Addresses in pid's namespace, or None if the pid vanished or moved namespace while being read."""
    base = os.path.join(proc_root, str(pid), "net")
    v4 = _read(os.path.join(base, "fib_trie"))
    v6 = _read(os.path.join(base, "if_inet6"))
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

    def find(
        self, pod_uid: str, *, container_ids: Iterable[str] = (), pod_ips: Iterable[str] = ()
    ) -> PodNetns:
        """Pin the pod's network namespace.

        container_ids (bare or "runtime://id") put those containers' processes first; any container of the
        pod would do, they share one namespace. pod_ips, when given, must include an address local to the
        namespace; they also settle which namespace is the pod's if its processes are in several.
        Raises PodNetnsNotFound; ValueError for a malformed pod IP.
        """
        uid = normalize_uid(pod_uid)
        wanted = {normalize_container_id(c) for c in container_ids}
        ips = {str(ipaddress.ip_address(ip.strip())) for ip in pod_ips}
        procs = sorted(self.processes(uid), key=lambda p: p.container_id not in wanted)
        if not procs:
            raise PodNetnsNotFound(
                f"pod {uid}: no process in a cgroup of this pod among {self.scanned} processes under "
                f"{self.proc_root} (pod not started yet, already gone, or proc root is not the node's)"
            )

        by_netns: dict[NetnsId, list[PodProcess]] = {}
        in_host: list[int] = []
        for proc in procs:
            ns = _netns_id(self.proc_root, proc.pid)
            if ns in self.host_ids:
                in_host.append(proc.pid)
            elif ns is not None:
                by_netns.setdefault(ns, []).append(proc)
        if not by_netns:
            gone = sorted({p.pid for p in procs} - set(in_host))
            raise PodNetnsNotFound(
                f"pod {uid}: found its processes but none in a pod network namespace: "
                f"in the host's (hostNetwork pod?): {in_host or 'none'}; exited: {gone or 'none'}"
            )

        matched: dict[NetnsId, tuple[str, ...]] = dict.fromkeys(by_netns, ())
        if ips:
            matched, seen = self._confirm(by_netns, ips)
            if not matched:
                raise PodNetnsNotFound(
                    f"pod {uid}: none of its IPs {sorted(ips)} is local to its network namespace(s): "
                    + "; ".join(f"{ns} has {addrs}" for ns, addrs in seen.items())
                )
        if len(matched) > 1:
            raise PodNetnsNotFound(
                f"pod {uid}: its processes are in {len(matched)} network namespaces "
                + ", ".join(f"{ns} (pids {[p.pid for p in by_netns[ns]]})" for ns in matched)
                + ("" if ips else "; pass the pod IPs to tell which one is the pod's")
                + "; refusing to guess"
            )
        ((ns_id, ns_ips),) = matched.items()
        return self._pin(uid, ns_id, by_netns[ns_id], ns_ips)

    def _confirm(
        self, by_netns: dict[NetnsId, list[PodProcess]], ips: set[str]
    ) -> tuple[dict[NetnsId, tuple[str, ...]], dict[NetnsId, list[str]]]:
        """Namespaces holding one of `ips` (with the ones matched), and every address seen, for messages."""
        matched: dict[NetnsId, tuple[str, ...]] = {}
        seen: dict[NetnsId, list[str]] = {}
        for ns, procs in by_netns.items():
            local = next(
                (a for a in (_local_ips(self.proc_root, p.pid, ns) for p in procs) if a is not None), None
            )
            if local is None:
                seen[ns] = ["(unreadable: its processes exited)"]
                continue
            seen[ns] = sorted(a for a in local if not ipaddress.ip_address(a).is_loopback)
            if hits := tuple(sorted(ips & local)):
                matched[ns] = hits
        return matched, seen

    def _pin(self, uid: str, ns: NetnsId, procs: list[PodProcess], ips: tuple[str, ...]) -> PodNetns:
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
                return PodNetns(uid, proc.pid, proc.container_id, pinned, ips)
            pinned.close()
        raise PodNetnsNotFound(
            f"pod {uid}: {ns} could not be pinned: its processes {[p.pid for p in procs]} exited, were "
            "replaced by other processes (PID reuse), or had no usable namespace link"
        )


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
