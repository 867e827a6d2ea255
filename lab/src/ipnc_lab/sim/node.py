"""One simulated Kubernetes node: pods as real network namespaces, real processes, kubelet-style cgroups.

    node netns: bridge br0 10.S.0.254/16  <-veth->  pod netns eth0 10.S.X.Y/16  (one per pod; never .0.254)

The node's namespace is a scratch namespace of the simulation, never the machine's: it holds the node's
IP (on lo, reported as every pod's status.hostIP; unique per process and node, since the simulations of
parallel runs share the machine and the gateway's subnet) and a long-lived process of the node's own (as
the kubelet is on a real node), so the controller can identify it only as it would on a real node: by
the node's IP. PID 1 of the machine is never in it, as if /proc/1/ns/net were unreadable.

Each pod's "sandbox" is a `sleep` inside its namespace, placed in the cgroup the kubelet's systemd driver
would use (`kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`), so pod discovery finds it by the
pod UID exactly as on a real node; the same process stands for the app container until
`restart_container` starts a new one. While a sandbox is created, the runtime's process of the pod's
cgroup (runc's init) lives in the node's namespace first: `begin_sandbox` starts it there and leaves it
until `create_sandbox` has made the sandbox (what add_pod does in one go). `recreate_sandbox` does what
the kubelet does after SandboxChanged (every process stopped, the namespace gone, a new namespace with a
new address, a new sandbox process, the runtime's process in the node's namespace meanwhile).
A hostNetwork pod gets the cgroup but no namespace of its own. Nothing is routed to or from the host
namespace; everything is removed by close(), also after a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .netns import NamedNetns, ip, ip_batch


def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts."""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise RuntimeError("no cgroup2 hierarchy is mounted")


@dataclass
class SimPod:
    name: str
    namespace: str
    uid: str
    ip: str | None
    netns: NamedNetns | None
    cgroup: Path
    container_id: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    app_container_id: str = ""
    """The container the status reports as the app's (the sandbox's own scope until a restart)."""
    sandboxes: int = 1
    host_ip: str = ""
    """The node's IP, as the kubelet reports it in status.hostIP."""
    transient: subprocess.Popen[str] | None = None
    """The runtime's process of the pod's cgroup in the node's namespace, while a sandbox is created."""

    @property
    def host_network(self) -> bool:
        return self.netns is None

    @property
    def container_ids(self) -> list[str]:
        """As the pod status spells them."""
        return [f"containerd://{self.app_container_id or self.container_id}"]


_node_numbers = itertools.count(1)


def unique_node_ip() -> str:
    """An address in 100.64.0.0/10 made of this process's PID and a counter (no other run reports it)."""
    pid, number = os.getpid() % 16384, next(_node_numbers) % 254 + 1
    return f"100.{64 + (pid >> 8)}.{pid & 255}.{number}"


class SimNode:
    """Create with a short unique name; use as a context manager so everything is removed at the end."""

    def __init__(self, name: str, subnet: int = 77) -> None:
        self.name = name
        self.subnet = subnet
        self.host_ip = unique_node_ip()
        self.pods: list[SimPod] = []
        self._lock = threading.Lock()
        self._next_host = 1
        self.cgroup_root = cgroup2_mount() / f"ipnc-{name}"
        self.node = NamedNetns(f"{name}-node")
        self.agent: subprocess.Popen[str] | None = None
        try:
            ip_batch(
                ["link set lo up", f"addr add {self.host_ip}/32 dev lo", "link add br0 type bridge",
                 f"addr add {self.gateway}/16 dev br0", "link set br0 up"],
                self.node.name,
            )  # fmt: skip
            self.cgroup_root.mkdir()
            self.agent = self.node.run(lambda: _popen(["sleep", "infinity"], 0, 0, None))
        except BaseException:
            self.close()
            raise

    @property
    def gateway(self) -> str:
        """The node namespace's own address: an in-simulation "outside" for inbound and outbound traffic."""
        return f"10.{self.subnet}.0.254"

    def __enter__(self) -> SimNode:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def add_pod(
        self, name: str, namespace: str, uid: str | None = None, *, host_network: bool = False
    ) -> SimPod:
        """Namespace (unless host_network), cgroup and sandbox process for a pod.

        Without `uid` the sandbox waits in a cgroup no discovery matches until adopt() gives it the UID the
        API server assigned (so namespaces can be made before a burst of API objects).
        """
        pod = self.begin_sandbox(name, namespace, uid)
        self.create_sandbox(pod, host_network=host_network)
        return pod

    def begin_sandbox(self, name: str, namespace: str, uid: str | None = None) -> SimPod:
        """The runtime starts on a pod: its cgroup, and its process there still in the node's namespace."""
        container_id = secrets.token_hex(32)
        pod = SimPod(name, namespace, uid or "", None, None, self._cgroup(uid, container_id), container_id)
        pod.host_ip = self.host_ip
        pod.cgroup.mkdir(parents=True)
        self.pods.append(pod)
        self._start_transient(pod)
        return pod

    def create_sandbox(self, pod: SimPod, *, host_network: bool = False) -> None:
        """The sandbox: namespace and address (unless host_network), its process; the runtime's exits."""
        if not host_network:
            self._plumb(pod)
        self.spawn(pod, ["sleep", "infinity"])
        self._stop_transient(pod)

    def _start_transient(self, pod: SimPod) -> None:
        process = self.node.run(lambda: _popen(["sleep", "infinity"], 0, 0, None))
        (pod.cgroup / "cgroup.procs").write_text(str(process.pid))
        pod.transient = process

    def _stop_transient(self, pod: SimPod) -> None:
        if pod.transient is not None:
            _stop(pod.transient)
            pod.transient = None

    def _plumb(self, pod: SimPod) -> None:
        """A new namespace with a new address on the node's bridge (what CNI gives a new sandbox)."""
        with self._lock:
            number = self._next_host
            self._next_host += 1
        pod.netns = NamedNetns(f"{self.name}-p{number}")
        pod.ip = f"10.{self.subnet}.{(number - 1) // 250}.{(number - 1) % 250 + 1}"
        veth = f"v{self.name[-6:]}{number}"[:15]
        ip_batch(
            [
                f"link add eth0 type veth peer name {veth} netns {self.node.name}",
                "link set lo up",
                f"addr add {pod.ip}/16 dev eth0",
                "link set eth0 up",
            ],
            pod.netns.name,
        )
        ip("-n", self.node.name, "link", "set", veth, "master", "br0", "up")

    def recreate_sandbox(self, pod: SimPod) -> None:
        """The sandbox died and the kubelet made a new one: new namespace, new IP, new processes.

        Nothing is written to the API here; the caller reports the new status (in the order it chooses).
        """
        if pod.netns is None:
            raise ValueError(f"{pod.name} is a hostNetwork pod: it has no sandbox namespace")
        self._stop_all(pod)
        pod.netns.delete()
        old = pod.cgroup
        pod.container_id = secrets.token_hex(32)
        pod.app_container_id = ""
        pod.cgroup = self._cgroup(pod.uid, pod.container_id)
        pod.cgroup.mkdir(parents=True)
        _remove_tree(old, stop_at=pod.cgroup.parent)
        self._start_transient(pod)
        pod.sandboxes += 1
        self.create_sandbox(pod)

    def restart_container(self, pod: SimPod) -> subprocess.Popen[str]:
        """The app container restarts in the same sandbox: a new container ID, a new process, same netns."""
        app_id = secrets.token_hex(32)
        scope = pod.cgroup.parent / f"cri-containerd-{app_id}.scope"
        scope.mkdir()
        process = self.spawn(pod, ["sleep", "infinity"], cgroup=scope)
        pod.app_container_id = app_id
        return process

    def _cgroup(self, uid: str | None, container_id: str) -> Path:
        if not uid:
            return self.cgroup_root / "unassigned" / f"cri-containerd-{container_id}.scope"
        slice_name = f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
        return (
            self.cgroup_root / "kubepods.slice" / "kubepods-besteffort.slice" / slice_name
            / f"cri-containerd-{container_id}.scope"
        )  # fmt: skip

    def adopt(self, pod: SimPod, uid: str) -> None:
        """Move the pod's processes into the kubelet cgroup of `uid` (the API object now exists)."""
        cgroup = self._cgroup(uid, pod.container_id)
        cgroup.mkdir(parents=True)
        for process in pod.processes:
            if process.poll() is None:
                (cgroup / "cgroup.procs").write_text(str(process.pid))
        old, pod.cgroup, pod.uid = pod.cgroup, cgroup, uid
        _remove_tree(old, stop_at=self.cgroup_root)

    def spawn(
        self,
        pod: SimPod,
        argv: Sequence[str],
        *,
        uid: int = 0,
        gid: int = 0,
        env: dict[str, str] | None = None,
        cgroup: Path | None = None,
    ) -> subprocess.Popen[str]:
        """Start a process in the pod's namespace as uid/gid and put it in the pod's cgroup (or `cgroup`)."""

        def start() -> subprocess.Popen[str]:
            return _popen(argv, uid, gid, env)

        process = start() if pod.netns is None else pod.netns.run(start)
        pod.processes.append(process)
        ((cgroup or pod.cgroup) / "cgroup.procs").write_text(str(process.pid))
        return process

    def _stop_all(self, pod: SimPod) -> None:
        self._stop_transient(pod)
        for process in pod.processes:
            _stop(process)
        pod.processes.clear()
        for scope in pod.cgroup.parent.glob("cri-containerd-*.scope"):
            if scope != pod.cgroup:
                _remove_tree(scope, stop_at=pod.cgroup.parent)

    def remove_pod(self, pod: SimPod) -> None:
        """Stop the pod's processes and delete its namespace and cgroup (the pod is gone from the node)."""
        self._stop_all(pod)
        if pod.netns is not None:
            pod.netns.delete()
            pod.netns = None
        _remove_tree(pod.cgroup, stop_at=self.cgroup_root)
        if pod in self.pods:
            self.pods.remove(pod)

    def close(self) -> None:
        for pod in list(self.pods):
            with contextlib.suppress(Exception):
                self.remove_pod(pod)
        if self.agent is not None:
            _stop(self.agent)
        with contextlib.suppress(Exception):
            self.node.delete()
        if self.cgroup_root.exists():
            _remove_tree(self.cgroup_root, stop_at=self.cgroup_root.parent)


def _popen(argv: Sequence[str], uid: int, gid: int, env: dict[str, str] | None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        user=uid,
        group=gid,
        extra_groups=[],
        env=env if env is not None else {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        cwd="/",
    )


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=3)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _remove_tree(leaf: Path, *, stop_at: Path) -> None:
    """rmdir every empty cgroup from the deepest up; a cgroup dir holds no files we could delete."""
    if leaf.exists():
        for root, _, _ in sorted(os.walk(leaf), key=lambda entry: -len(entry[0])):
            with contextlib.suppress(OSError):
                os.rmdir(root)
    parent = leaf.parent
    while parent != stop_at and parent.is_relative_to(stop_at):
        try:
            os.rmdir(parent)
        except OSError:
            break
        parent = parent.parent
