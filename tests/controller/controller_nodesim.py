"""A simulated node for end-to-end tests and the benchmark: pods as real processes in real namespaces.

Each pod: a network namespace with a veth pair to a shared peer namespace (the pod's address is its
status.podIP), a `sleep` started inside it with `ip netns exec`, moved into a cgroup named the way the
kubelet's systemd driver names it (.../kubepods-besteffort-pod<uid_>.slice/cri-containerd-<64hex>.scope).
The controller runs as a real subprocess against a `LocalAPIServer` with an RBAC user of exactly the
controller's rules. Everything created is recorded and removed by `close()`; only PIDs started here are
killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from istio_pod_network_controller import annotations as ann
from istio_pod_network_controller.dataplane.netns import PinnedNetns, run_in
from istio_pod_network_controller.localapi import PODS, LocalAPIServer, ThreadedServer

CGROUP2 = Path("/sys/fs/cgroup/unified")
CONTROLLER_RULES = [
    {"verbs": ["get", "list", "watch", "patch"], "resources": ["pods"], "apiGroups": [""]},
    {"verbs": ["get", "list", "watch"], "resources": ["namespaces"], "apiGroups": [""]},
    {"verbs": ["create", "patch"], "resources": ["events"], "apiGroups": [""]},
]
CONTROLLER_USER = "ipnc-controller"
_seq = iter(range(1, 10**9))


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def ip_batch(commands: list[str], netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    done = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{argv}: {done.stderr.strip()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mesh_annotations() -> dict[str, str]:
    return {ann.SIDECAR_STATUS: '{"initContainers":["istio-pod-network-wait"],"containers":["istio-proxy"]}'}


def pod_manifest(name: str, namespace: str, node: str, *, mesh: bool = True, ip4: str | None = None,
                 annotations: dict[str, str] | None = None, host_network: bool = False,
                 labels: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    notes = {**(mesh_annotations() if mesh else {}), **(annotations or {})}
    inits = [{"name": ann.WAITER_CONTAINER, "image": "ipnc"}] if mesh else []
    status: dict[str, Any] = {"phase": "Running" if ip4 else "Pending"}
    if ip4:
        status |= {"podIP": ip4, "podIPs": [{"ip": ip4}]}
    return {
        "metadata": {"name": name, "namespace": namespace, "annotations": notes, "labels": labels or {}},
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "initContainers": inits,
            "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxy"}],
        },
        "status": status,
    }


@dataclass
class SimPod:
    name: str
    netns: str | None
    ip4: str | None
    peer4: str | None
    proc: subprocess.Popen[bytes] | None = None
    uid: str | None = None
    cgroup: Path | None = None

    def exec(self, argv: list[str]) -> str:
        assert self.netns
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True,
                              timeout=20, check=True).stdout  # fmt: skip


@dataclass
class Node:
    """One simulated node; `close()` removes everything it made."""

    name: str
    subnet: int
    api: ThreadedServer
    workdir: Path
    cgroot: Path
    peer: str
    pods: list[SimPod] = field(default_factory=list)
    controllers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    listeners: list[socket.socket] = field(default_factory=list)
    count: int = 0

    # -- pods -----------------------------------------------------------------------------------------------

    def make_netns(self, name: str, *, with_process: bool = True) -> SimPod:
        """A pod network namespace with its veth to the peer namespace, and (optionally) its process."""
        i = self.count
        self.count += 1
        base = i * 4
        ip4 = f"10.{self.subnet}.{base >> 8}.{(base & 255) + 1}"
        peer4 = f"10.{self.subnet}.{base >> 8}.{(base & 255) + 2}"
        ns = f"{self.name}p{i}"
        ip("netns", "add", ns)
        pod = SimPod(name, ns, ip4, peer4)
        self.pods.append(pod)
        ip_batch([f"link add eth0 type veth peer name v{i} netns {self.peer}",
                  f"addr add {ip4}/30 dev eth0", "link set lo up", "link set eth0 up"], ns)  # fmt: skip
        ip_batch([f"addr add {peer4}/30 dev v{i}", f"link set v{i} up"], self.peer)
        if with_process:
            self.start_process(pod)
        return pod

    def host_pod(self, name: str) -> SimPod:
        """A hostNetwork pod: its process stays in the host's network namespace."""
        pod = SimPod(name, None, None, None)
        self.pods.append(pod)
        self.start_process(pod)
        return pod

    def start_process(self, pod: SimPod) -> None:
        prefix = ["ip", "netns", "exec", pod.netns] if pod.netns else []
        pod.proc = subprocess.Popen([*prefix, "sleep", "100000"], stdin=subprocess.DEVNULL)
        if pod.uid:
            self.enter_cgroup(pod)

    def enter_cgroup(self, pod: SimPod) -> None:
        """Put the pod's process in the cgroup the kubelet would use for pod.uid."""
        assert pod.proc and pod.uid
        slice_dir = self.cgroot / "kubepods.slice" / "kubepods-besteffort.slice"
        pod_dir = slice_dir / f"kubepods-besteffort-pod{pod.uid.replace('-', '_')}.slice"
        scope = pod_dir / f"cri-containerd-{secrets.token_hex(32)}.scope"
        scope.mkdir(parents=True)
        pod.cgroup = pod_dir
        (scope / "cgroup.procs").write_text(str(pod.proc.pid))

    def create(self, pod: SimPod, namespace: str = "default", **kwargs: Any) -> dict[str, Any]:
        manifest = pod_manifest(pod.name, namespace, self.name, ip4=pod.ip4, **kwargs)
        (obj,) = self.api.store.seed(PODS, [manifest])
        pod.uid = obj["metadata"]["uid"]
        if pod.proc is not None:
            self.enter_cgroup(pod)
        return obj

    def get(self, pod: SimPod, namespace: str = "default") -> dict[str, Any]:
        return dict(self.api.store.get(PODS, namespace, pod.name))

    def annotations(self, pod: SimPod, namespace: str = "default") -> dict[str, str]:
        return dict(self.get(pod, namespace)["metadata"].get("annotations") or {})

    def initialized(self, pod: SimPod, namespace: str = "default") -> bool:
        return self.annotations(pod, namespace).get(ann.STATUS) == ann.STATUS_INITIALIZED

    # -- controller -----------------------------------------------------------------------------------------

    def kubeconfig(self) -> Path:
        path = self.workdir / "controller.kubeconfig"
        if not path.exists():
            user = self.api.add_user(CONTROLLER_USER, secrets.token_hex(16), CONTROLLER_RULES)
            self.api.api.write_kubeconfig(path, user)
        return path

    def start_controller(self, *extra: str, port: int | None = None) -> Controller:
        port = port or free_port()
        log = open(self.workdir / f"controller-{len(self.controllers)}.log", "wb")  # noqa: SIM115
        argv = [sys.executable, "-m", "istio_pod_network_controller", "run", "--kubeconfig",
                str(self.kubeconfig()), "--node-name", self.name, "--listen-address", f"127.0.0.1:{port}",
                "--log-format", "text", "--relist-jitter", "0.2", *extra]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.controllers.append(proc)
        return Controller(proc, port, self.workdir / f"controller-{len(self.controllers) - 1}.log")

    # -- traffic --------------------------------------------------------------------------------------------

    def listen(self, pod: SimPod, port: int, label: str) -> None:
        """A listener in the pod's namespace answering `label orig-port` to each connection."""
        assert pod.netns
        pinned = PinnedNetns.open_path(f"/run/netns/{pod.netns}")
        try:

            def make() -> socket.socket:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", port))
                s.listen(8)
                return s

            sock = run_in(pinned, make)
        finally:
            pinned.close()
        self.listeners.append(sock)

        def serve() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                with conn:
                    try:
                        raw = conn.getsockopt(socket.SOL_IP, 80, 16)
                        orig = struct.unpack_from("!2xH", raw)[0]
                    except OSError:
                        orig = 0
                    conn.sendall(f"{label} {orig}\n".encode())

        threading.Thread(target=serve, daemon=True).start()

    def connect(self, pod: SimPod, port: int) -> str:
        """From the peer namespace to the pod's address: the answering listener's line, or the error."""
        pinned = PinnedNetns.open_path(f"/run/netns/{self.peer}")

        def dial() -> str:
            try:
                with socket.create_connection((pod.ip4, port), timeout=2) as s:
                    return s.makefile().readline().strip()
            except OSError as exc:
                return f"error {exc}"

        try:
            return run_in(pinned, dial)
        finally:
            pinned.close()

    # -- teardown -------------------------------------------------------------------------------------------

    def close(self) -> None:
        for proc in self.controllers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for sock in self.listeners:
            sock.close()
        for pod in self.pods:
            if pod.proc is not None and pod.proc.poll() is None:
                pod.proc.kill()
                pod.proc.wait(10)
        for pod in self.pods:
            if pod.netns:
                subprocess.run(["ip", "netns", "del", pod.netns], check=False)
        subprocess.run(["ip", "netns", "del", self.peer], check=False)
        remove_cgroup_tree(self.cgroot)


def remove_cgroup_tree(root: Path) -> None:
    """rmdir bottom-up (cgroup directories cannot be removed recursively); retries while tasks exit."""
    if not root.exists():
        return
    dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for path in [*dirs, root]:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)


@dataclass
class Controller:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def wait_ready(self, timeout: float = 20) -> None:
        wait_for(lambda: self.http("/readyz")[0] == 200, timeout, f"controller ready\n{self.log()}")

    def metric(self, name: str, labels: str = "") -> float:
        _, text = self.http("/metrics")
        pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
        total = 0.0
        for match in pattern.finditer(text):
            if labels in (match.group(1) or ""):
                total += float(match.group(2))
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def terminate(self, timeout: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


_subnets = iter(range(100, 250))


@contextlib.contextmanager
def simulated_node(
    prefix: str, *, bookmark_interval: float = 60.0, history_size: int = 1000
) -> Iterator[Node]:
    """An emulator in a thread and an empty node; everything is removed afterwards."""
    name = f"{prefix}{os.getpid() % 10000}x{next(_seq)}"
    workdir = Path(tempfile.mkdtemp(prefix="ipnc-node-"))
    api = LocalAPIServer(bookmark_interval=bookmark_interval, history_size=history_size).start_in_thread()
    peer = f"{name}peer"
    node: Node | None = None
    try:
        ip("netns", "add", peer)
        node = Node(name, (os.getpid() + next(_subnets)) % 200 + 20, api, workdir, CGROUP2 / name, peer)
        yield node
    finally:
        if node is not None:
            node.close()
        else:
            subprocess.run(["ip", "netns", "del", peer], check=False)
        api.stop()
        for path in sorted(workdir.glob("*")):
            path.unlink()
        workdir.rmdir()


def events_for(api: ThreadedServer, pod_name: str, namespace: str = "default") -> list[dict[str, Any]]:
    from istio_pod_network_controller.localapi import CORE_EVENTS

    return [e for e in api.store.objects(CORE_EVENTS, namespace) if e["involvedObject"]["name"] == pod_name]


def host_rules() -> str:
    """The host namespace's rules in every system, counters and comments removed."""
    out = []
    for argv in (["iptables-legacy-save"], ["ip6tables-legacy-save"], ["iptables-nft-save"],
                 ["ip6tables-nft-save"], ["nft", "list", "ruleset"]):  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        out.append(f"== {argv[0]} rc={done.returncode}\n{done.stdout}")
    text = "\n".join(out)
    text = re.sub(r"^#.*$", "", text, flags=re.MULTILINE)
    return re.sub(r"\[\d+:\d+\]", "[]", text)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)[:4000]
