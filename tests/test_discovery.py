"""Pod network-namespace discovery: cgroup parsing (pure) and real processes in real cgroups and netns (root).

The root tests build what a node has: named network namespaces holding a pod's addresses, processes in them,
and cgroup directories named like the kubelet's (cgroupfs and systemd forms, cgroup2 and v1). No systemd, no
container runtime, no traffic.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from istio_pod_network_controller.dataplane import discovery, netns
from istio_pod_network_controller.dataplane.discovery import (
    InvalidPodIP,
    PodNetnsNotFound,
    ProcIndex,
    find_pod_netns,
    parse_cgroup,
    parse_cgroup_line,
    parse_fib_trie_local,
    parse_if_inet6,
    parse_start_time,
)

UID = "0f3c2a4e-9b1d-4c6e-8f20-1a2b3c4d5e6f"
UID_ = UID.replace("-", "_")
CID = "a" * 63 + "1"
CID2 = "b" * 63 + "2"
STATIC_UID = "2d1b6a6c0c8f4cd2a3f8e7a1b6c9d0e1"
NODE_IPS = ("10.250.255.254",)
"""The node's IP as pods' status.hostIPs report it: a namespace holding it is the node's."""


# --- pure parsers -----------------------------------------------------------------------------------------

POD_LINES = [
    # cgroupfs driver, v1 and v2, every QoS class
    (f"4:memory:/kubepods/burstable/pod{UID}/{CID}", UID, CID),
    (f"0::/kubepods/besteffort/pod{UID}/{CID}", UID, CID),
    (f"11:pids:/kubepods/pod{UID}/{CID}", UID, CID),
    (f"3:cpu,cpuacct:/kubepods/pod{UID}/{CID}", UID, CID),
    # process directly in the pod cgroup: pod known, container not
    (f"0::/kubepods/burstable/pod{UID}", UID, None),
    # systemd driver: UID spelled with underscores; containerd, CRI-O, docker scopes
    (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope",
        UID,
        CID,
    ),
    (f"1:name=systemd:/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope", UID, CID),
    (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"docker-{CID}.scope",
        UID,
        CID,
    ),
    # CRI-O with crun on cgroup2 nests the payload one level deeper
    (f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope/container", UID, CID),
    # CRI-O with the cgroupfs driver
    (f"0::/kubepods/burstable/pod{UID}/crio-{CID}", UID, CID),
    # kind / nested node: the node container's cgroup comes first
    (f"0::/docker/{CID2}/kubepods/besteffort/pod{UID}/{CID}", UID, CID),
    (f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/{CID}", UID, CID),
    # static pod: the UID is a 32-hex config hash
    (f"0::/kubepods/burstable/pod{STATIC_UID}/{CID}", STATIC_UID, CID),
    # unknown container naming: still the pod's process, container unknown
    (f"0::/kubepods/burstable/pod{UID}/libpod-{CID}.scope", UID, None),
    # surrounding whitespace / newline as read from the file
    (f"  0::/kubepods/pod{UID}/{CID}\n", UID, CID),
]

NON_POD_LINES = [
    "0::/",
    "0::/init.scope",
    "12:memory:/user.slice/user-1000.slice/session-2.scope",
    f"0::/system.slice/docker-{CID}.scope",  # plain docker container, not a pod
    f"0::/docker/{CID}",
    "0::/kubepods/burstable",  # QoS cgroup, no pod
    "1:name=systemd:/kubepods.slice/kubepods-burstable.slice",
    # conmon runs in the host netns next to the pod's containers: never the pod's
    f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope",
    f"0::/kubepods/burstable/pod{UID}/crio-conmon-{CID}",
    # malformed
    "",
    "garbage",
    f"kubepods/pod{UID}/{CID}",  # no hierarchy fields
    f"x::/kubepods/pod{UID}/{CID}",  # non-numeric hierarchy id
    "0::/kubepods/pod0f3c2a4e-9b1d-4c6e-8f20/abc",  # truncated UID
    f"0::/kubepods/pod{UID}x/{CID}",  # UID followed by junk
    f"0::/kubepodsx/pod{UID}/{CID}",  # not the kubepods root
    f"0::/other/pod{UID}/{CID}",  # pod-looking segment outside kubepods
]


@pytest.mark.parametrize(("line", "uid", "cid"), POD_LINES)
def test_parse_pod_lines(line: str, uid: str, cid: str | None) -> None:
    assert parse_cgroup_line(line) == (uid, cid)


@pytest.mark.parametrize("line", NON_POD_LINES)
def test_parse_non_pod_lines(line: str) -> None:
    assert parse_cgroup_line(line) is None


def test_parse_upper_case_uid_is_normalized() -> None:
    assert parse_cgroup_line(f"0::/kubepods/pod{UID}/{CID}") == parse_cgroup(f"0::/kubepods/pod{UID}/{CID}")
    assert discovery.normalize_uid(UID.upper()) == UID
    assert discovery.normalize_uid(UID_) == UID
    assert discovery.normalize_container_id(f"containerd://{CID}") == CID
    assert discovery.normalize_container_id(f"cri-o://{CID}") == CID
    assert discovery.normalize_container_id(CID.upper()) == CID


def test_parse_v1_file_with_one_line_per_hierarchy() -> None:
    text = "\n".join(
        [
            f"12:pids:/kubepods/burstable/pod{UID}/{CID}",
            f"11:memory:/kubepods/burstable/pod{UID}/{CID}",
            "10:rdma:/",
            f"1:name=systemd:/kubepods/burstable/pod{UID}/{CID}",
            "0::/",
            "",
        ]
    )
    assert parse_cgroup(text) == (UID, CID)


def test_parse_file_takes_container_from_any_line() -> None:
    # some v1 hierarchies may stop at the pod level while others name the container
    text = f"5:cpuset:/kubepods/pod{UID}\n4:memory:/kubepods/pod{UID}/{CID}\n"
    assert parse_cgroup(text) == (UID, CID)


def test_parse_file_refuses_a_process_claimed_by_two_pods() -> None:
    text = f"4:memory:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{STATIC_UID}/{CID}\n"
    assert parse_cgroup(text) is None


def test_parse_file_conmon_anywhere_means_not_a_pod_process() -> None:
    text = f"4:memory:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{UID}/crio-conmon-{CID}\n"
    assert parse_cgroup(text) is None


def test_parse_file_non_pod() -> None:
    assert parse_cgroup("9:name=systemd:/\n0::/user.slice/session-1.scope\n") is None
    assert parse_cgroup("") is None


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.17
           /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.17
        /32 host LOCAL
     |-- 192.168.9.9
        /24 link UNICAST
        /32 host LOCAL
"""

IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fd000250000000000000000000000001 02 80 00 82     pod0
fe8000000000000054439afffef555c1 02 40 20 c0     pod0
"""


def test_parse_fib_trie_local_addresses_only() -> None:
    # network, broadcast and /8 local route are not addresses; a leaf with several entries still counts
    assert parse_fib_trie_local(FIB_TRIE) == {"10.244.1.17", "127.0.0.1", "192.168.9.9"}
    assert parse_fib_trie_local("") == set()


def test_parse_start_time_survives_hostile_command_names() -> None:
    tail = " ".join(["S", *["0"] * 18, "123456", "0", "0"])
    assert parse_start_time(f"42 (sleep) {tail}") == 123456
    assert parse_start_time(f"42 (a) b) S 1 2 3) {tail}") == 123456  # a process can name itself ") S 1"
    assert parse_start_time("42 (x) S 1") is None
    assert parse_start_time("") is None


def test_parse_if_inet6() -> None:
    assert parse_if_inet6(IF_INET6) == {"::1", "fd00:250::1", "fe80::5443:9aff:fef5:55c1"}
    assert parse_if_inet6("\n") == set()


# --- a node in miniature: netns, cgroups, processes (root) ----------------------------------------------

UNIFIED = "/sys/fs/cgroup/unified"
PIDS_V1 = "/sys/fs/cgroup/pids"
_COUNTER = itertools.count(1)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _ns_ino(path: str) -> int:
    return os.stat(path).st_ino


def wait_next_tick(pid: int) -> None:
    """Until a process started now would have a later start time (clock ticks) than `pid`."""
    started = parse_start_time(Path(f"/proc/{pid}/stat").read_text())
    assert started is not None
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + 10
    while int(time.clock_gettime(time.CLOCK_BOOTTIME) * hz) <= started + 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)


@dataclass
class Netns:
    name: str
    v4: str
    v6: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def id(self) -> netns.NetnsId:
        info = os.stat(self.path)
        return netns.NetnsId(info.st_dev, info.st_ino)


class Node:
    """Creates netns, cgroup dirs and processes with unique names; close() removes them, and only them."""

    def __init__(self) -> None:
        self.prefix = f"ipnc-disc-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.namespaces: list[str] = []
        self.cgroups: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def netns(self) -> Netns:
        n = next(_COUNTER)
        ns = Netns(f"{self.prefix}-{n}", f"10.250.{n // 250}.{n % 250 + 1}", f"fd00:250::{n:x}")
        _run("ip", "netns", "add", ns.name)
        self.namespaces.append(ns.name)
        for kind in ("dummy", "bridge"):  # some kernels lack the dummy driver; a portless bridge does as well
            with contextlib.suppress(subprocess.CalledProcessError):
                _run("ip", "-n", ns.name, "link", "add", "pod0", "type", kind)
                break
        _run("ip", "-n", ns.name, "link", "set", "pod0", "up")
        _run("ip", "-n", ns.name, "addr", "add", f"{ns.v4}/32", "dev", "pod0")
        _run("ip", "-n", ns.name, "addr", "add", f"{ns.v6}/128", "dev", "pod0", "nodad")
        return ns

    def cgroup(self, root: str, rel: str) -> str:
        """mkdir root/<prefix>/rel level by level, recording each created dir for removal."""
        path = os.path.join(root, self.prefix)
        for part in ["", *rel.split("/")]:
            path = os.path.join(path, part) if part else path
            if not os.path.isdir(path):
                os.mkdir(path)
                self.cgroups.append(path)
        return path

    def pod_cgroupfs(self, uid: str, cid: str, root: str = UNIFIED) -> str:
        return self.cgroup(root, f"kubepods/burstable/pod{uid}/{cid}")

    def pod_systemd(self, uid: str, cid: str) -> str:
        slice_ = f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
        return self.cgroup(
            UNIFIED, f"kubepods.slice/kubepods-burstable.slice/{slice_}/cri-containerd-{cid}.scope"
        )

    def spawn(self, ns: Netns | None, cgroup: str | None) -> int:
        """A `sleep` in `ns` (None: the host's), moved into `cgroup`; returns once both are in effect."""
        argv = ["sleep", "300"] if ns is None else ["ip", "netns", "exec", ns.name, "sleep", "300"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        if ns is not None:  # `ip netns exec` setns()es and then execs sleep under the same PID
            want = _ns_ino(ns.path)
            deadline = time.monotonic() + 10
            while _ns_ino(f"/proc/{proc.pid}/ns/net") != want:
                assert time.monotonic() < deadline, "process never entered its netns"
                time.sleep(0.002)
        if cgroup is not None:
            Path(cgroup, "cgroup.procs").write_text(str(proc.pid))
        wait_next_tick(proc.pid)
        return proc.pid

    def kill(self, pid: int) -> None:
        for proc in self.procs:
            if proc.pid == pid:
                proc.kill()
                proc.wait(timeout=10)

    def delete_netns(self, name: str) -> None:
        _run("ip", "netns", "del", name)
        self.namespaces.remove(name)

    def close(self) -> None:
        errors: list[str] = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"pid {proc.pid} did not exit")
        for name in self.namespaces:
            if subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False).returncode:
                errors.append(f"netns {name}")
        for path in reversed(self.cgroups):  # innermost first; our processes are reaped, so all are empty
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        break
                    if exc.errno != errno.EBUSY:
                        errors.append(f"{path}: {exc}")
                        break
                    time.sleep(0.01)
            else:
                errors.append(f"{path}: still busy")
        assert not errors, f"cleanup left behind: {errors}"


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    try:
        yield n
    finally:
        n.close()


def new_uid() -> str:
    return str(uuid.uuid4())


def new_cid() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def assert_is(found: discovery.PodNetns, ns: Netns) -> None:
    assert found.netns.id == ns.id
    assert os.fstat(found.netns.fd).st_ino == _ns_ino(ns.path)


@pytest.mark.root
def test_cgroupfs_v2_pod_is_found_with_its_ips(node: Node) -> None:
    uid, cid, ns = new_uid(), new_cid(), node.netns()
    pid = node.spawn(ns, node.pod_cgroupfs(uid, cid))

    with find_pod_netns(uid, pod_ips=[ns.v4, ns.v6.upper(), "10.99.99.99"], host_ips=NODE_IPS) as found:
        assert (found.pod_uid, found.pid, found.container_id) == (uid, pid, cid)
        assert_is(found, ns)
        assert found.matched_ips == tuple(sorted([ns.v4, ns.v6]))
        assert found.netns.id not in netns.node_netns().ids
    assert found.netns.fd == -1  # leaving the block released the namespace


@pytest.mark.root
def test_systemd_v2_pod_is_found_by_container_id_with_runtime_scheme(node: Node) -> None:
    uid, cid, ns = new_uid(), new_cid(), node.netns()
    pid = node.spawn(ns, node.pod_systemd(uid, cid))
    found = find_pod_netns(uid.replace("-", "_").upper(), [f"containerd://{cid}"], [ns.v4], host_ips=NODE_IPS)
    try:
        assert (found.pod_uid, found.pid, found.container_id, found.matched_ips) == (uid, pid, cid, (ns.v4,))
        assert_is(found, ns)
    finally:
        found.netns.close()


@pytest.mark.root
def test_cgroup_v1_hierarchy_pod_is_found(node: Node) -> None:
    uid, cid, ns = new_uid(), new_cid(), node.netns()
    pid = node.spawn(ns, node.cgroup(PIDS_V1, f"kubepods/besteffort/pod{uid}/crio-{cid}.scope"))
    assert f"pids:/{node.prefix}/kubepods/besteffort/pod{uid}/" in Path(f"/proc/{pid}/cgroup").read_text()
    found = find_pod_netns(uid, pod_ips=[ns.v6], host_ips=NODE_IPS)
    try:
        assert (found.pid, found.container_id, found.matched_ips) == (pid, cid, (ns.v6,))
        assert_is(found, ns)
    finally:
        found.netns.close()


@pytest.mark.root
def test_wrong_ip_is_refused_and_the_message_lists_what_is_there(node: Node) -> None:
    uid, ns = new_uid(), node.netns()
    node.spawn(ns, node.pod_cgroupfs(uid, new_cid()))
    with pytest.raises(PodNetnsNotFound, match="none of its IPs") as info:
        find_pod_netns(uid, pod_ips=["10.251.0.1", "fd00:251::1"], host_ips=NODE_IPS)
    message = str(info.value)
    assert ns.v4 in message
    assert ns.v6 in message
    assert "127.0.0.1" not in message


@pytest.mark.root
def test_unknown_pod_is_refused(node: Node) -> None:
    with pytest.raises(PodNetnsNotFound, match="no process in a cgroup of this pod"):
        find_pod_netns(new_uid(), pod_ips=["10.250.255.1"], host_ips=NODE_IPS)


@pytest.mark.root
def test_pod_process_in_host_netns_is_never_returned(node: Node) -> None:
    uid, ns = new_uid(), node.netns()
    host_cid, pod_cid = new_cid(), new_cid()
    host_pid = node.spawn(None, node.pod_cgroupfs(uid, host_cid))

    with pytest.raises(PodNetnsNotFound, match=rf"node's: \[{host_pid}\]"):
        find_pod_netns(uid, pod_ips=[ns.v4], host_ips=NODE_IPS)

    pod_pid = node.spawn(ns, node.pod_cgroupfs(uid, pod_cid))
    # even when the host-netns process's container is the one asked for
    found = find_pod_netns(uid, [host_cid], [ns.v4], host_ips=NODE_IPS)
    try:
        assert (found.pid, found.container_id) == (pod_pid, pod_cid)
        assert_is(found, ns)
    finally:
        found.netns.close()


@pytest.mark.root
def test_listed_containers_are_preferred(node: Node) -> None:
    uid, ns = new_uid(), node.netns()
    sandbox, app = new_cid(), new_cid()
    node.spawn(ns, node.pod_cgroupfs(uid, sandbox))
    app_pid = node.spawn(ns, node.pod_systemd(uid, app))
    index = ProcIndex.scan()
    assert len(index.processes(uid)) == 2
    for wanted in ([app], [f"cri-o://{app}", "c" * 64]):
        with index.find(uid, container_ids=wanted, pod_ips=[ns.v4], host_ips=NODE_IPS) as found:
            assert (found.pid, found.container_id) == (app_pid, app)
            assert_is(found, ns)


@pytest.mark.root
def test_the_earliest_process_names_the_sandbox_and_other_namespaces_are_reported(node: Node) -> None:
    uid, sandbox, later = new_uid(), node.netns(), node.netns()
    first = node.spawn(sandbox, node.pod_cgroupfs(uid, new_cid()))
    node.spawn(later, node.pod_cgroupfs(uid, new_cid()))
    index = ProcIndex.scan()

    for ips in ([sandbox.v4], [sandbox.v4, later.v4]):
        with index.find(uid, pod_ips=ips, host_ips=NODE_IPS) as found:
            assert found.pid == first
            assert_is(found, sandbox)
            assert found.others == (later.id,)
    # an IP only the later namespace holds does not move the choice: the sandbox is not the one described
    with pytest.raises(PodNetnsNotFound, match=r"none of its IPs.*sandbox"):
        index.find(uid, pod_ips=[later.v4], host_ips=NODE_IPS)
    assert set(index.namespaces(uid)) == {sandbox.id, later.id}


@pytest.mark.root
def test_no_pod_ip_in_the_status_means_not_yet(node: Node) -> None:
    uid, ns = new_uid(), node.netns()
    node.spawn(ns, node.pod_cgroupfs(uid, new_cid()))
    with pytest.raises(PodNetnsNotFound, match="no pod IP given yet"):
        find_pod_netns(uid, host_ips=NODE_IPS)


@pytest.mark.root
def test_the_runtimes_process_in_the_nodes_namespace_never_names_the_sandbox(node: Node) -> None:
    """While the runtime creates the sandbox a process of the pod's cgroup (runc's init) is still in the
    node's namespace, and it started first: the namespace holding the node's IP is never chosen."""
    uid, the_node = (
        new_uid(),
        node.netns(),
    )  # a scratch namespace stands for the node's; its v4 is the node IP
    host_ips = [the_node.v4]
    node.spawn(the_node, node.pod_cgroupfs(uid, new_cid()))
    with pytest.raises(PodNetnsNotFound, match="no pod IP"):
        find_pod_netns(uid, host_ips=host_ips)
    sandbox = node.netns()
    with pytest.raises(PodNetnsNotFound, match=r"none of its IPs.*node's: \[\d+\]"):
        find_pod_netns(uid, pod_ips=[sandbox.v4], host_ips=host_ips)  # IP posted, sandbox not seen yet
    pause = node.spawn(sandbox, node.pod_cgroupfs(uid, new_cid()))
    # even a node namespace that also holds the pod's IP is not the pod's
    _run("ip", "-n", the_node.name, "addr", "add", f"{sandbox.v4}/32", "dev", "pod0")
    with find_pod_netns(uid, pod_ips=[sandbox.v4], host_ips=host_ips) as found:
        assert found.pid == pause
        assert_is(found, sandbox)
        assert found.netns.not_node
        assert found.others == ()
    # nor is it one of "the pod's other namespaces" (no ForeignNetworkNamespace for the runtime's process)
    assert set(ProcIndex.scan().namespaces(uid, host_ips)) == {sandbox.id}
    assert set(ProcIndex.scan().namespaces(uid)) == {sandbox.id, the_node.id}
    # the node's namespace is found by its IP (how the alarm looks for our rules there)
    held = discovery.pin_holding(host_ips)
    try:
        assert the_node.id in {h.id for h in held}  # other runs' namespaces may hold the same test address
        assert sandbox.id not in {h.id for h in held}
    finally:
        for handle in held:
            handle.close()
    with pytest.raises(PodNetnsNotFound, match="the node's IP"):
        find_pod_netns(uid, pod_ips=[the_node.v4], host_ips=host_ips)


@pytest.mark.root
def test_a_tenants_namespace_holding_the_pod_ip_is_reported_never_chosen(node: Node) -> None:
    uid, sandbox, tenant = new_uid(), node.netns(), node.netns()
    pause = node.spawn(sandbox, node.pod_cgroupfs(uid, new_cid()))
    node.spawn(tenant, node.pod_cgroupfs(uid, new_cid()))
    _run("ip", "-n", tenant.name, "addr", "add", f"{sandbox.v4}/32", "dev", "pod0")
    with find_pod_netns(uid, pod_ips=[sandbox.v4], host_ips=NODE_IPS) as found:
        assert found.pid == pause
        assert_is(found, sandbox)
        assert found.others == (tenant.id,)


@pytest.mark.root
def test_a_malformed_pod_ip_is_its_own_error(node: Node) -> None:
    uid, ns = new_uid(), node.netns()
    node.spawn(ns, node.pod_cgroupfs(uid, new_cid()))
    for bad in ("10.0.0.300", "fe80::1%eth0", "not an ip"):
        with pytest.raises(InvalidPodIP, match="not an IP address") as info:
            find_pod_netns(uid, pod_ips=[ns.v4, bad])
        assert bad not in str(info.value)
        assert not isinstance(info.value, ValueError)


@pytest.mark.root
def test_zombies_and_vanished_processes_do_not_raise(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    uid, ns = new_uid(), node.netns()
    cgroup = node.pod_cgroupfs(uid, new_cid())
    zombie = node.spawn(ns, cgroup)
    os.kill(zombie, signal.SIGKILL)  # not reaped: stays a zombie until the fixture waits for it
    deadline = time.monotonic() + 10
    while "State:\tZ" not in Path(f"/proc/{zombie}/status").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.002)
    gone = node.spawn(None, None)
    node.kill(gone)

    real_pids = discovery._pids
    monkeypatch.setattr(discovery, "_pids", lambda root: itertools.chain(real_pids(root), [gone]))
    with pytest.raises(PodNetnsNotFound, match=r"this pod|exited"):
        ProcIndex.scan().find(uid, pod_ips=[ns.v4], host_ips=NODE_IPS)

    live = node.spawn(ns, cgroup)
    with ProcIndex.scan().find(uid, pod_ips=[ns.v4], host_ips=NODE_IPS) as found:
        assert found.pid == live
        assert_is(found, ns)


@pytest.mark.root
def test_process_exiting_between_scan_and_find_is_reported(node: Node) -> None:
    uid, ns = new_uid(), node.netns()
    pid = node.spawn(ns, node.pod_cgroupfs(uid, new_cid()))
    index = ProcIndex.scan()
    node.kill(pid)
    with pytest.raises(PodNetnsNotFound, match=rf"exited: \[{pid}\]"):
        index.find(uid, pod_ips=[ns.v4], host_ips=NODE_IPS)


@pytest.mark.root
def test_burst_of_twenty_pods_from_one_scan(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    pods: list[tuple[str, str, Netns, int]] = []
    for _ in range(20):
        uid, cid, ns = new_uid(), new_cid(), node.netns()
        cgroup = node.pod_cgroupfs(uid, cid) if len(pods) % 2 else node.pod_systemd(uid, cid)
        pods.append((uid, cid, ns, node.spawn(ns, cgroup)))

    listings: list[str] = []
    cgroup_reads: list[str] = []
    real_pids, real_read = discovery._pids, discovery._read

    def counting_pids(root: str) -> Iterator[int]:
        listings.append(root)
        return real_pids(root)

    def counting_read(path: str) -> bytes | None:
        if path.endswith("/cgroup"):
            cgroup_reads.append(path)
        return real_read(path)

    monkeypatch.setattr(discovery, "_pids", counting_pids)
    monkeypatch.setattr(discovery, "_read", counting_read)

    index = ProcIndex.scan()
    scanned_reads = len(cgroup_reads)
    assert scanned_reads == index.scanned >= 20
    for uid, cid, ns, pid in pods:
        with find_pod_netns(uid, [cid], [ns.v4], host_ips=NODE_IPS, index=index) as found:
            assert (found.pid, found.container_id, found.matched_ips) == (pid, cid, (ns.v4,))
            assert_is(found, ns)
    assert listings == ["/proc"]
    # after the scan, each find re-reads exactly one cgroup file: the pinned PID's membership re-check
    assert cgroup_reads[scanned_reads:] == [f"/proc/{pid}/cgroup" for *_, pid in pods]


@pytest.mark.root
def test_handle_survives_pid_reuse_and_netns_deletion(node: Node) -> None:
    uid, ns = new_uid(), node.netns()
    pid = node.spawn(ns, node.pod_cgroupfs(uid, new_cid()))
    original = ns.id
    found = find_pod_netns(uid, pod_ips=[ns.v4], host_ips=NODE_IPS)
    try:
        node.kill(pid)
        node.delete_netns(ns.name)
        other = node.netns()
        node.spawn(other, node.pod_cgroupfs(uid, new_cid()))  # the "same pod" now lives elsewhere

        assert found.netns.id == original != other.id
        inside = netns.run_in(found.netns, lambda: Path("/proc/thread-self/net/if_inet6").read_text())
        assert ns.v6 in parse_if_inet6(inside)
        assert other.v6 not in parse_if_inet6(inside)
        addrs = netns.run_in(
            found.netns,
            lambda: (
                subprocess.run(
                    ["ip", "-o", "addr", "show", "dev", "pod0"], capture_output=True, text=True, check=True
                ).stdout
            ),
        )
        assert f"{ns.v4}/32" in addrs
        assert other.v4 not in addrs
    finally:
        found.netns.close()


# --- a fake proc root ---------------------------------------------------------------------------------


def fake_pid(root: Path, pid: int, cgroup: str, ns_path: str, fib: str = "", inet6: str = "") -> Path:
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    (d / "net").mkdir()
    (d / "cgroup").write_text(cgroup)
    (d / "stat").write_text(" ".join([f"{pid} (sleep) S", *["0"] * 18, "1000", "0"]))
    (d / "ns" / "net").symlink_to(ns_path)
    (d / "net" / "fib_trie").write_text(fib)
    (d / "net" / "if_inet6").write_text(inet6)
    return d


def fib_with(ip: str) -> str:
    return f"Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- {ip}\n        /32 host LOCAL\n"


@pytest.mark.root
def test_proc_root_is_honoured(node: Node, tmp_path: Path) -> None:
    uid, cid, ns = new_uid(), new_cid(), node.netns()
    fake_pid(tmp_path, 99999999, f"0::/kubepods/pod{uid}/{cid}\n", ns.path, fib_with(ns.v4))
    (tmp_path / "self").mkdir()  # non-numeric entries are not processes
    (tmp_path / "1").mkdir()  # an "init" without readable files: vanished-like, not an error

    with pytest.raises(PodNetnsNotFound, match="no process"):
        find_pod_netns(uid, pod_ips=[ns.v4], host_ips=NODE_IPS)  # the real /proc knows nothing of it
    index = ProcIndex.scan(str(tmp_path))
    assert index.scanned == 2
    with find_pod_netns(uid, pod_ips=[ns.v4], host_ips=NODE_IPS, index=index) as found:
        assert (found.pid, found.container_id, found.matched_ips) == (99999999, cid, (ns.v4,))
        assert_is(found, ns)
    with find_pod_netns(uid, [], [ns.v4], host_ips=NODE_IPS, proc_root=str(tmp_path)) as found:
        assert found.pid == 99999999


@pytest.mark.root
@pytest.mark.parametrize("change", ["cgroup", "netns"])
def test_pid_reused_before_the_open_is_detected(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """PID 4242 is the pod's when scanned and stat()ed, and someone else's by the time its ns is opened."""
    uid, ns, elsewhere = new_uid(), node.netns(), node.netns()
    d = fake_pid(tmp_path, 4242, f"0::/kubepods/pod{uid}/{CID}\n", ns.path, fib_with(ns.v4))
    index = ProcIndex.scan(str(tmp_path))
    real_open = netns.PinnedNetns.open_pid

    def reuse_then_open(pid: int, proc_root: str = "/proc") -> netns.PinnedNetns:
        if change == "cgroup":  # another pod's process, here the open succeeds and the re-read catches it
            (d / "cgroup").write_text(f"0::/kubepods/pod{new_uid()}/{CID}\n")
        else:  # a process in another namespace, still in a cgroup named like the pod's
            (d / "ns" / "net").unlink()
            (d / "ns" / "net").symlink_to(elsewhere.path)
        return real_open(pid, proc_root)

    monkeypatch.setattr(netns.PinnedNetns, "open_pid", staticmethod(reuse_then_open))
    with pytest.raises(PodNetnsNotFound, match=r"could not be pinned.*PID reuse"):
        index.find(uid, pod_ips=[ns.v4], host_ips=NODE_IPS)


def test_a_pid_without_a_usable_netns_is_not_pinned(tmp_path: Path) -> None:
    fake_pid(tmp_path, 7, f"0::/kubepods/pod{UID}/{CID}\n", "/dev/null", fib_with("10.250.0.9"))
    index = ProcIndex.scan(str(tmp_path))
    assert index.processes(UID) == (discovery.PodProcess(7, CID),)
    with pytest.raises(PodNetnsNotFound, match="could not be pinned"):
        index.find(UID, pod_ips=["10.250.0.9"], host_ips=NODE_IPS)


@pytest.mark.root
def test_a_pin_is_trusted_only_while_its_fd_is_the_namespace_it_was_opened_on(node: Node) -> None:
    uid, cid, ns = new_uid(), new_cid(), node.netns()
    pid = node.spawn(ns, node.pod_cgroupfs(uid, cid))
    found = find_pod_netns(uid, pod_ips=[ns.v4], host_ips=NODE_IPS)
    pin = found.netns
    assert pin.intact() and ProcIndex.scan().namespaces(uid) == {ns.id: [discovery.PodProcess(pid, cid)]}
    fd = pin.fd
    os.close(fd)  # the fd number is now free: whatever gets it next is not this namespace
    other = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert other == fd and not pin.intact()
        with pytest.raises(netns.DataplaneError, match="no longer"):
            netns.run_in(pin, lambda: None)
    finally:
        os.close(other)
        pin.fd = -1
    assert not pin.intact()


@pytest.mark.root
def test_an_unreadable_pid_1_without_the_node_ip_fails_closed(node: Node, tmp_path: Path) -> None:
    """A proc root whose PID 1 cannot be read (as /proc/1/ns/net on real nodes): without the node's IP
    nothing is proven, so nothing is chosen, and a namespace reached through a PID is refused."""
    uid, ns = new_uid(), node.netns()
    fake_pid(tmp_path, 4243, f"0::/kubepods/pod{uid}/{CID}\n", ns.path, fib_with(ns.v4))
    index = ProcIndex.scan(str(tmp_path))
    assert not index.node.pid1_known
    with pytest.raises(PodNetnsNotFound, match=r"cannot be identified.*fail closed"):
        index.find(uid, pod_ips=[ns.v4])
    with netns.PinnedNetns.open_pid(4243, str(tmp_path)) as by_pid:
        with pytest.raises(netns.HostNetnsRefused, match="cannot be read"):
            netns.refuse_host(by_pid, str(tmp_path))
        netns.refuse_host(by_pid, str(tmp_path), allow_host=True)
    with netns.PinnedNetns.open_path(ns.path) as by_path:
        netns.refuse_host(by_path, str(tmp_path))  # a namespace file named explicitly: the caller's choice
    with index.find(uid, pod_ips=[ns.v4], host_ips=NODE_IPS) as found:  # proven by the node's IP
        assert_is(found, ns)
        netns.refuse_host(found.netns, str(tmp_path))

    (tmp_path / "1" / "ns").mkdir(parents=True)
    (tmp_path / "1" / "ns" / "net").symlink_to("/proc/self/ns/net")  # a readable PID 1
    index = ProcIndex.scan(str(tmp_path))
    assert index.node.pid1_known
    with index.find(uid, pod_ips=[ns.v4]) as found:
        assert_is(found, ns)
        assert not found.netns.not_node
        netns.refuse_host(found.netns, str(tmp_path))
