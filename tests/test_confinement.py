"""The controller's confinement (controller/confinement.py) outside the image, in a process of its own.

Confinement is permanent, so each check runs in a fresh interpreter that confines itself exactly as `run`
does and reports what it could reach as JSON. The neighbour is a process the test starts in a chroot
holding a resolv.conf; the host file is a scratch file of the test.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipnc_lab.sim.cluster import SimCluster, unique_name
from ipnc_lab.sim.controller import wait_for
from istio_pod_network_controller.controller import confinement
from istio_pod_network_controller.controller.kubeconfig import load, resolve
from istio_pod_network_controller.dataplane import landlock, netns, seccomp
from istio_pod_network_controller.dataplane.nsbroker import NsBroker
from istio_pod_network_controller.errors import DataplaneError

PROBE = r"""
import ctypes, errno, json, os, socket, subprocess, sys
from istio_pod_network_controller.controller import confinement
from istio_pod_network_controller.dataplane import netns, procfs, resolvconf, seccomp
args = json.loads(sys.argv[1])
target, scratch = args["target"], args["scratch"]
broker = confinement.confine(confinement.Policy(proc_root="/proc", connect_ports=(args["allowed"],)))
out = {}

def errno_of(action):
    try:
        action()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"

def connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass

libc = ctypes.CDLL(None, use_errno=True)
def mount():
    if libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")

libc.syscall.restype = ctypes.c_long
def syscall(name, *args):
    def call():
        number = seccomp.syscall_number(name)
        if libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args]) < 0:
            raise OSError(ctypes.get_errno(), name)
    return call

bpf_attr = (ctypes.c_uint32 * 18)(2, 4, 4, 1)  # BPF_MAP_CREATE: an array of one 4-byte value
perf_attr = (ctypes.c_uint32 * 32)(1, 128)  # PERF_TYPE_SOFTWARE, size 128, CPU clock
out["bpf"] = errno_of(syscall("bpf", 0, ctypes.addressof(bpf_attr), 72))
out["perf_event_open"] = errno_of(syscall("perf_event_open", ctypes.addressof(perf_attr), 0, -1, -1, 0))
out["keyctl"] = errno_of(syscall("keyctl", 0, -3, 0))  # KEYCTL_GET_KEYRING_ID of the session keyring
out["ns_direct"] = errno_of(lambda: os.close(os.open(f"/proc/{target}/ns/net", os.O_RDONLY)))
out["root_read"] = errno_of(lambda: open(f"/proc/{target}/root/etc/resolv.conf").read())
out["scratch_read"] = errno_of(lambda: open(scratch).read())
out["scratch_write"] = errno_of(lambda: open(scratch, "a").write("pwned"))
out["mount"] = errno_of(mount)
out["signal"] = errno_of(lambda: os.kill(target, 0))
out["connect_allowed"] = errno_of(lambda: connect(args["allowed"]))
out["connect_other"] = errno_of(lambda: connect(args["other"]))
with netns.PinnedNetns.open_pid(target) as pinned:
    out["netns"] = [pinned.id.dev, pinned.id.ino]
    out["nameservers"] = [str(a) for a in resolvconf.pod_nameservers([target], pinned.id)]
out["cgroup"] = procfs.read("/proc", target, "cgroup").decode()
out["host_netns"] = errno_of(lambda: os.close(broker.open_netns(os.getpid())))  # the lab runs in the host's
child = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"],
                       capture_output=True, text=True, check=True).stdout
out["child_capeff"] = int(child.split("CapEff:")[1].split()[0], 16)
out["broker_capeff"] = int(open(f"/proc/{broker.pid}/status").read().split("CapEff:")[1].split()[0], 16)
broker.close()
print(json.dumps(out))
"""

pytestmark = pytest.mark.root
CLONE_NEWNET = 0x40000000


@pytest.fixture
def neighbour(tmp_path: Path) -> Iterator[int]:
    """A process in a network namespace of its own, chrooted into a root holding etc/resolv.conf (a pod, as
    the broker sees one); killed and reaped after (its namespace goes with it)."""
    rootfs = tmp_path / unique_name("rootfs")
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "resolv.conf").write_text("search svc.cluster.local\nnameserver 10.96.0.10\n")
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only sleeps in its chroot
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
                os._exit(1)
            os.chroot(rootfs)
            os.write(ready_write, b"1")
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            time.sleep(600)
        finally:
            os._exit(0)
    os.close(ready_write)
    ready = os.read(ready_read, 1)  # blocks until the child is in place (or has exited: b"")
    os.close(ready_read)
    try:
        assert ready == b"1", "the neighbour could not make its namespace and root"
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.fixture
def listeners() -> Iterator[tuple[int, int]]:
    """Two loopback TCP listeners (accept in a thread): the one the policy allows, and another."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    stop = threading.Event()

    def accept(sock: socket.socket) -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                sock.accept()[0].close()
            except TimeoutError:
                continue

    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in socks]
    for thread in threads:
        thread.start()
    try:
        yield socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for sock in socks:
            sock.close()


def test_the_confined_controller_keeps_its_namespaces_and_loses_the_rest(
    neighbour: int, listeners: tuple[int, int], tmp_path: Path
) -> None:
    assert landlock.abi() >= 6, "this kernel lacks Landlock scopes (ABI 6): the test would prove less"
    scratch = tmp_path / unique_name("host-file")
    scratch.write_text("the node's\n")
    allowed, other = listeners
    args = {"target": neighbour, "scratch": str(scratch), "allowed": allowed, "other": other}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    info = os.stat(f"/proc/{neighbour}/ns/net")
    denied = ("ns_direct", "root_read", "scratch_read", "scratch_write", "mount", "signal", "connect_other")
    assert {key: seen[key] for key in ("bpf", "perf_event_open", "keyctl")} == dict.fromkeys(
        ("bpf", "perf_event_open", "keyctl"), "EPERM"
    )
    assert {key: seen[key] for key in denied} == {
        "ns_direct": "EACCES",
        "root_read": "EACCES",
        "scratch_read": "EACCES",
        "scratch_write": "EACCES",
        "mount": "EPERM",
        "signal": "EPERM",
        "connect_other": "EACCES",
    }
    assert seen["connect_allowed"] == "ok"
    assert seen["host_netns"] == "EPERM", "the broker hands out no fd of the node's own namespace"
    assert scratch.read_text() == "the node's\n"
    # What the controller needs, through the broker: the namespace, the nameservers, the cgroup file.
    assert seen["netns"] == [info.st_dev, info.st_ino]
    assert seen["nameservers"] == ["10.96.0.10"]
    assert seen["cgroup"] == Path(f"/proc/{neighbour}/cgroup").read_text()
    # CAP_SYS_PTRACE: gone from the controller and from what it executes, the broker's alone.
    ptrace = 1 << 19
    assert not seen["child_capeff"] & ptrace
    assert seen["broker_capeff"] == ptrace


def test_the_seccomp_filter_knows_every_denied_call_on_each_architecture() -> None:
    for machine in ("x86_64", "aarch64"):
        numbers = [seccomp.syscall_number(name, machine) for name in seccomp.DENIED]
        assert len(set(numbers)) == len(seccomp.DENIED), machine
        code = seccomp.program(machine)
        assert code[-1] == (0x06, 0, 0, 0x7FFF0000)  # allow what is not denied
        assert {k for op, _, _, k in code if op == 0x15} >= set(numbers)


def test_confinement_refuses_a_process_that_already_has_threads() -> None:
    started = threading.Event()
    stop = threading.Event()
    thread = threading.Thread(target=lambda: (started.set(), stop.wait()), daemon=True)
    thread.start()
    started.wait()
    try:
        with pytest.raises(confinement.ConfinementError, match="single-threaded"):
            confinement.confine(confinement.Policy(proc_root="/proc"))
    finally:
        stop.set()
        thread.join()


def test_without_landlock_the_controller_refuses_to_start_confined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(landlock, "abi", lambda: 0)
    with pytest.raises(
        confinement.ConfinementError, match=r"Landlock is unavailable .*--no-confine runs it unconfined"
    ):
        confinement.confine(confinement.Policy(proc_root="/proc"))


def test_no_confine_says_loudly_what_a_compromise_then_reaches(tmp_path: Path) -> None:
    missing = tmp_path / "missing-kubeconfig"
    argv = [sys.executable, "-m", "istio_pod_network_controller", "run", "--no-confine", "--node-name", "n"]
    done = subprocess.run(
        [*argv, "--kubeconfig", str(missing)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 3, done.stderr  # the kubeconfig is missing: after the warning
    assert "CONFINEMENT OFF (--no-confine)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("server", "port"), [("https://10.0.0.1", 443), ("https://api:6443", 6443), ("http://h", 80)]
)
def test_api_port(server: str, port: int) -> None:
    assert confinement.api_port(server) == port


def test_a_proxy_from_the_environment_is_reachable_too() -> None:
    env = {"HTTPS_PROXY": "http://proxy:3128", "http_proxy": "proxy2:8080", "ALL_PROXY": "http://[bad"}
    assert confinement.api_ports("https://api:6443", env) == (6443, 3128, 8080)
    assert confinement.api_ports("https://api", {}) == (443,)


def test_the_client_s_files_are_in_the_policy(tmp_path: Path) -> None:
    """The kubeconfig's directory and every directory it names a file in (read again on rotation)."""
    token_dir = tmp_path / "tokens"
    token_dir.mkdir()
    (token_dir / "token").write_text("t")
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"tokenFile": str(token_dir / "token")}}],
            }
        )
    )
    loaded = load(resolve(str(path), {}, str(tmp_path), str(tmp_path / "none")))
    assert loaded.files == (str(tmp_path), str(token_dir))


def test_a_controller_whose_broker_died_is_unhealthy_and_a_restart_captures_again() -> None:
    """Killing the broker (a crash, or a compromise denying service) fails /healthz, so the kubelet restarts
    the controller; the restarted one initializes pods again."""
    with SimCluster() as cluster:
        node = cluster.add_node()
        first = cluster.add_pod(node, unique_name("app"))
        ctl = cluster.start_controller(node)
        ctl.wait_ready()
        cluster.wait_initialized([first], 30, ctl.log)
        assert "confined: Landlock ABI" in ctl.log()
        (broker,) = Path(f"/proc/{ctl.pid}/task/{ctl.pid}/children").read_text().split()
        assert ctl.http("/healthz")[0] == 200
        os.kill(int(broker), signal.SIGKILL)
        wait_for(lambda: ctl.http("/healthz")[0] == 503, 30, f"/healthz 503\n{ctl.log()}")
        assert ctl.terminate() == 0
        second = cluster.add_pod(node, unique_name("app"))
        restarted = cluster.start_controller(node)
        restarted.wait_ready()
        cluster.wait_initialized([second], 30, restarted.log)
        assert restarted.terminate() == 0


def test_a_broker_that_does_not_answer_in_time_is_given_up_never_read_late() -> None:
    """A late answer would be taken for the next request's: after a timeout the channel is closed, the broker
    exits on it, and every later request fails (the controller then fails /healthz)."""
    broker = NsBroker.start("/proc")
    try:
        assert broker.netns_id(os.getpid()) == netns.pid_netns_id("/proc", os.getpid())
        os.kill(broker.pid, signal.SIGSTOP)
        broker._sock.settimeout(0.2)  # instead of TIMEOUT_SECONDS
        with pytest.raises(DataplaneError, match="does not answer"):
            broker.netns_id(os.getpid())
        os.kill(broker.pid, signal.SIGCONT)
        with pytest.raises(DataplaneError):
            broker.netns_id(os.getpid())
        wait_for(lambda: not broker.alive(), 10, "the broker exits once its channel is closed")
    finally:
        if broker.alive():  # our unreaped child: its PID cannot have been reused
            os.kill(broker.pid, signal.SIGKILL)
        broker.close()
