"""Find a pod's network namespace from the node's /proc, by pod UID, and pin it.

The kubelet names every pod's cgroup after the pod UID, so /proc/PID/cgroup maps processes to pods without
asking the container runtime. Runtime helpers such as CRI-O's conmon (host namespace) are ignored. A
namespace is taken for the pod's sandbox only on proof, never on a guess:

- it holds one of the pod IPs the kubelet posted (`status.podIPs`): no IP in the status yet means "not
  yet". While the runtime creates the sandbox a process of the pod's cgroup (runc's init) still lives in
  the node's namespace, so "the namespace of the pod's earliest process" alone can be the node's;
- it is not the node's namespace, identified positively: PID 1's and ours (when readable), and any
  namespace holding the node's IP (`status.hostIP`). When PID 1's cannot be read and the node's IP is not
  known, nothing is proven and nothing is chosen (fail closed);
- it is the namespace of the pod's earliest-started process outside the node's namespace: the runtime
  makes the sandbox before any container runs, and no later process can take back a start time the
  kernel records. So a tenant's own namespace (`unshare -Urn` needs no privilege, and it can be given the
  pod's IP) is never chosen, and an earlier namespace without the pod's IPs means "not yet" (the API does
  not describe that sandbox yet). Namespaces that start in the same clock tick are refused; the others
  are reported, never chosen.

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
from .netns import NetnsId, NodeNetns, PinnedNetns, node_netns, run_in

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


def parse_start_time(stat: str) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks after boot); the command name may hold ')'."""
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _start_time(proc_root: str, pid: int) -> int | None:
    data = _read(os.path.join(proc_root, str(pid), "stat"))
    return None if data is None else parse_start_time(data.decode("utf-8", "replace"))


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
        self.node: NodeNetns = node_netns(proc_root)

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

    def namespaces(self, pod_uid: str, host_ips: Iterable[str] = ()) -> dict[NetnsId, list[PodProcess]]:
        """The pod's live processes by namespace, read now (not at scan time); the node's are left out
        (PID 1's, ours, and those holding one of `host_ips`: the runtime's process starting a container)."""
        by_netns: dict[NetnsId, list[PodProcess]] = {}
        for proc in self.processes(pod_uid):
            ns = _netns_id(self.proc_root, proc.pid)
            if ns is not None and ns not in self.node.ids:
                by_netns.setdefault(ns, []).append(proc)
        node_ips = _parse_ips(normalize_uid(pod_uid), host_ips)
        if node_ips:
            for ns in [
                ns for ns, members in by_netns.items() if (self._local(members, ns) or set()) & node_ips
            ]:
                del by_netns[ns]
        return by_netns

    def holds(self, pod_uid: str, ns: NetnsId, ips: Iterable[str]) -> bool:
        """Whether `ns`, read through a live process of the pod in it, holds every one of `ips`."""
        members = self.namespaces(pod_uid).get(ns)
        local = None if members is None else self._local(members, ns)
        return local is not None and _parse_ips(normalize_uid(pod_uid), ips) <= local

    def find(
        self,
        pod_uid: str,
        *,
        container_ids: Iterable[str] = (),
        pod_ips: Iterable[str] = (),
        host_ips: Iterable[str] = (),
    ) -> PodNetns:
        """Pin the pod's sandbox namespace, proven as the module docstring says.

        pod_ips: the kubelet's `status.podIPs` (none: not yet). host_ips: the node's (`status.hostIPs`); a
        namespace holding one is the node's. container_ids (bare or "runtime://id") choose which of the
        sandbox's processes to pin through. Raises PodNetnsNotFound, or InvalidPodIP for a malformed IP.
        """
        uid = normalize_uid(pod_uid)
        wanted = {normalize_container_id(c) for c in container_ids}
        ips = _parse_ips(uid, pod_ips)
        node_ips = _parse_ips(uid, host_ips)
        if not ips:
            raise PodNetnsNotFound(
                f"pod {uid}: no pod IP given yet (the kubelet posts status.podIPs once the sandbox exists)"
            )
        if ips & node_ips:
            raise PodNetnsNotFound(f"pod {uid}: its pod IP is the node's IP (a hostNetwork pod?)")
        if not node_ips and not self.node.pid1_known:
            raise PodNetnsNotFound(
                f"pod {uid}: the node's network namespace cannot be identified ({self.proc_root}/1/ns/net "
                "is unreadable and the pod's status names no host IP); refusing to choose (fail closed)"
            )
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
            if ns in self.node.ids:
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
                f"in the node's: {in_host or 'none'}; exited: {gone or 'none'}"
            )
        matched: dict[NetnsId, tuple[str, ...]] = {}
        seen: dict[NetnsId, list[str]] = {}
        for ns, members in list(by_netns.items()):
            local = self._local(members, ns)
            if local is not None and local & node_ips:
                in_host.extend(p.pid for p in by_netns.pop(ns))
                del started[ns]
            elif local is not None and local & ips:
                matched[ns] = tuple(sorted(local & ips))
            else:
                seen[ns] = sorted(a for a in local or () if not ipaddress.ip_address(a).is_loopback)
        first = min((started[ns] for ns in matched), default=_UNKNOWN_START)
        earlier = [ns for ns in seen if started[ns] < first]
        if not matched or earlier:
            raise PodNetnsNotFound(
                f"pod {uid}: none of its IPs {sorted(ips)} is local to the namespace of its earliest "
                f"process: in the node's: {sorted(in_host) or 'none'}; others: "
                + (", ".join(f"{ns} has {seen[ns]}" for ns in earlier or seen) or "none")
                + " (a sandbox the API does not describe yet?)"
            )
        earliest = [ns for ns in matched if started[ns] == first]
        if len(earliest) > 1:
            raise PodNetnsNotFound(
                f"pod {uid}: cannot tell which namespace holding its IPs is the sandbox's: "
                + ", ".join(f"{ns} (pids {[p.pid for p in by_netns[ns]]})" for ns in earliest)
                + "; refusing to guess"
            )
        (ns_id,) = earliest
        others = tuple(ns for ns in by_netns if ns != ns_id)
        found = self._pin(uid, ns_id, by_netns[ns_id], matched[ns_id], others)
        found.netns.not_node = bool(node_ips)
        return found

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
            raise InvalidPodIP(f"pod {uid}: its status lists a pod or host IP that is not an IP address")
        parsed.add(str(address))
    return parsed


def prove_not_node(netns: PinnedNetns, host_ips: Iterable[str]) -> bool:
    """Mark `netns` proven not the node's (`not_node`) when node IPs are known and it holds none of them."""
    wanted = _parse_ips("node", host_ips)

    def local() -> set[str]:
        v4 = _read("/proc/thread-self/net/fib_trie") or b""
        v6 = _read("/proc/thread-self/net/if_inet6") or b""
        return parse_fib_trie_local(v4.decode()) | parse_if_inet6(v6.decode())

    if wanted and not wanted & run_in(netns, local):
        netns.not_node = True
    return netns.not_node


def pin_holding(ips: Iterable[str], proc_root: str = "/proc") -> list[PinnedNetns]:
    """Pin every namespace on the node that holds one of `ips` (the node's: to find its namespace).

    One stat per process and one read of addresses per distinct namespace; a namespace is pinned through
    the process it was read through and kept only if the pin is still that namespace.
    """
    wanted = _parse_ips("node", ips)
    if not wanted:
        return []
    checked: set[NetnsId] = set()
    pinned: list[PinnedNetns] = []
    for pid in _pids(proc_root):
        try:
            ns = _netns_id(proc_root, pid)
            local = None if ns is None or ns in checked else _local_ips(proc_root, pid, ns)
        except OSError:  # a process this controller may not inspect: not one it could identify either
            continue
        if ns is None or local is None:
            continue
        checked.add(ns)
        if local & wanted:
            try:
                handle = PinnedNetns.open_pid(pid, proc_root)
            except DataplaneError:
                checked.discard(ns)
                continue
            if handle.id == ns:
                handle.description = f"the namespace holding the node's IP ({ns}, pid {pid})"
                pinned.append(handle)
            else:
                handle.close()
                checked.discard(ns)
    return pinned


def find_pod_netns(
    pod_uid: str,
    container_ids: Iterable[str] = (),
    pod_ips: Iterable[str] = (),
    *,
    host_ips: Iterable[str] = (),
    proc_root: str = "/proc",
    index: ProcIndex | None = None,
) -> PodNetns:
    """ProcIndex.find on `index`, or on a fresh scan of proc_root (an index carries its own proc root)."""
    return (index if index is not None else ProcIndex.scan(proc_root)).find(
        pod_uid, container_ids=container_ids, pod_ips=pod_ips, host_ips=host_ips
    )
