"""Traffic harness: real TCP/UDP through real capture rules, between two throw-away network namespaces.

Topology (one per test, so every test starts from a fresh, empty netfilter and conntrack state):

    pod netns   eth0 10.251.N.1/24 fd00:251:N::1/64  ==veth==  eth0 10.251.N.2/24 fd00:251:N::2/64   peer
                                                                    (.3 and ::3 too: a second server)

A dual-stack pair by default; `ipv4=False` builds an IPv6-only pair (no IPv4 address outside lo). Both ends
of the veth are created inside the namespaces (nothing appears in the host namespace), there is no default
route and forwarding stays off, so no packet can leave the pair.

Listeners and clients come from `ipnc_lab.sim.traffic` (shared with the demo). The pod's DNS proxy is a
fake istio-agent run as the proxy uid (as Istio's is): it answers on 127.0.0.1/::1:15053 after asking the
peer's DNS server itself with the lab's probe, so a test sees both legs (see DNS_AGENT_SRC).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ipnc_lab.sim.netns import NamedNetns, ip
from ipnc_lab.sim.traffic import (
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
    PROBE_SRC,
    PYTHON,
    SOL_IPV6,
    Received,
    Reply,
    Server,
    connect,
)
from istio_pod_network_controller.dataplane import apply as dataplane
from istio_pod_network_controller.dataplane.apply import ApplyResult, BackendChoice, Drift
from istio_pod_network_controller.settings.spec import TPROXY_MARK, InterceptSpec

_SEQ = itertools.count(1)
_PID = os.getpid()
APP_UID = 1000
PROXY_ID = 1337


# --- topology ----------------------------------------------------------------------------------------------


DNS_AGENT_SRC = (
    PROBE_SRC
    + r"""
import selectors

SO_ORIGINAL_DST = 80
upstreams = json.loads(sys.argv[1])

def ask(family, proto, token):
    addr = upstreams.get(str(family))
    if addr is None:
        return "error:no upstream"
    try:
        got = probe({"dst": addr, "port": 53, "proto": proto, "token": token, "timeout": 2.0})
    except ValueError as exc:
        return "error:" + type(exc).__name__
    return got["reply"].get("label", "error:no label") if got["ok"] else "error:" + got["error"]

def answer(family, proto, token, orig, local):
    body = {"label": "dns-proxy:15053", "token": token, "orig": orig, "local": list(local[:2]),
            "upstream": ask(family, proto, token)}
    return json.dumps(body).encode() + b"\n"

sel = selectors.DefaultSelector()
for fam, host, family in ((socket.AF_INET, "127.0.0.1", 4), (socket.AF_INET6, "::1", 6)):
    for proto in ("udp", "tcp"):
        s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, 15053))
        if proto == "tcp":
            s.listen(16)
        sel.register(s, selectors.EVENT_READ, (family, proto))
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        family, proto = key.data
        try:
            if proto == "udp":
                sock = key.fileobj
                data, source = sock.recvfrom(65535)
                sock.sendto(answer(family, proto, data.decode().strip(), None, sock.getsockname()), source)
                continue
            conn, _ = key.fileobj.accept()
            with conn:
                conn.settimeout(2.0)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                level, size = (socket.IPPROTO_IP, 16) if family == 4 else (socket.IPPROTO_IPV6, 28)
                try:
                    raw = conn.getsockopt(level, SO_ORIGINAL_DST, size)
                    fam = socket.AF_INET if family == 4 else socket.AF_INET6
                    port = int.from_bytes(raw[2:4], "big")
                    orig = [socket.inet_ntop(fam, raw[4:8] if family == 4 else raw[8:24]), port]
                except OSError:
                    orig = None
                conn.sendall(answer(family, proto, data.decode().strip(), orig, conn.getsockname()))
        except (OSError, ValueError):
            continue
"""
)
"""A fake istio-agent DNS proxy: run as the proxy uid, it asks the peer's DNS server (same family and
protocol) itself, then answers the app with its own label and the label of who answered it (`upstream`)."""


class DnsAgent:
    """DNS_AGENT_SRC as the proxy uid/gid inside the pod namespace; stopped by its PID."""

    def __init__(self, ns: NamedNetns, upstreams: dict[int, str]) -> None:
        argv = [
            PYTHON,
            "-I",
            "-S",
            "-c",
            DNS_AGENT_SRC,
            json.dumps({str(k): v for k, v in upstreams.items()}),
        ]

        def start() -> subprocess.Popen[str]:
            return subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd="/",
                user=PROXY_ID,
                group=PROXY_ID,
                extra_groups=[],
                env={"PATH": "/usr/bin:/bin"},
            )

        self.process = ns.run(start)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        line = self.process.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"DNS agent did not start: {line!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


class OriginalSrcEnvoy:
    """Envoy's TPROXY inbound with the original_src listener filter, in miniature (root, in-process).

    An IP_TRANSPARENT listener on `port` accepts the client's connection (its local address is the original
    destination), then connects to that destination from the client's own address (IP_TRANSPARENT bind) with
    SO_MARK 1337, relays the client's token line, and answers the client with the app's label as `upstream`
    (or `error:...`). Only Istio's CONNMARK rules bring the app's replies to the spoofed source back here.
    """

    def __init__(self, ns: NamedNetns, port: int, families: tuple[int, ...]) -> None:
        self.ns = ns
        self.seen: list[tuple[tuple[str, int], tuple[str, int]]] = []
        self._listeners = [ns.run(lambda f=f: self._listen(f, port)) for f in families]  # type: ignore[misc]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="origsrc-envoy", daemon=True)
        self._thread.start()

    @staticmethod
    def _transparent(family: int) -> socket.socket:
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        sock = socket.socket(fam, socket.SOCK_STREAM)
        if family == 4:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        return sock

    def _listen(self, family: int, port: int) -> socket.socket:
        sock = self._transparent(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("0.0.0.0" if family == 4 else "::", port))
        sock.listen(8)
        sock.settimeout(0.2)
        return sock

    def _upstream(self, family: int, client: tuple[str, int], dst: tuple[str, int], line: bytes) -> str:
        def connect() -> socket.socket:
            sock = self._transparent(family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TPROXY_MARK)
            sock.settimeout(1.0)
            sock.bind((client[0], 0))
            sock.connect(dst)
            return sock

        try:
            sock = self.ns.run(connect)
        except OSError as exc:
            return f"error:{type(exc).__name__}"
        with sock:
            try:
                sock.sendall(line)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return str(json.loads(data)["label"])
            except (OSError, ValueError, KeyError) as exc:
                return f"error:{type(exc).__name__}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            for listener in self._listeners:
                try:
                    conn, client = listener.accept()
                except (TimeoutError, OSError):
                    continue
                with conn:
                    conn.settimeout(3.0)
                    local = conn.getsockname()[:2]
                    self.seen.append((tuple(client[:2]), tuple(local)))  # type: ignore[arg-type]
                    family = 4 if conn.family == socket.AF_INET else 6
                    try:
                        line = conn.recv(4096)
                        upstream = self._upstream(family, client[:2], local, line)
                        body = {"label": "origsrc-envoy", "token": line.decode().strip(), "orig": None,
                                "local": list(local), "upstream": upstream}  # fmt: skip
                        conn.sendall(json.dumps(body).encode() + b"\n")
                    except OSError:
                        continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for listener in self._listeners:
            listener.close()


@dataclass
class Topology:
    """pod + peer namespaces joined by a veth pair, with recording listeners and a client helper."""

    n: int
    pod: NamedNetns
    peer: NamedNetns
    ipv4: bool = True
    server: Server = field(default_factory=Server)
    agent: DnsAgent | None = None
    extra: list[NamedNetns] = field(default_factory=list)
    """More namespaces a test added (say, a KubeVirt VM), deleted with the topology."""

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv4 else (6,)

    @property
    def pod4(self) -> str:
        return f"10.251.{self.n % 250 + 1}.1"

    @property
    def peer4(self) -> str:
        return f"10.251.{self.n % 250 + 1}.2"

    @property
    def pod6(self) -> str:
        return f"fd00:251:{self.n % 0xFFFF:x}::1"

    @property
    def peer6(self) -> str:
        return f"fd00:251:{self.n % 0xFFFF:x}::2"

    def pod_ip(self, family: int) -> str:
        assert family in self.families, f"IPv{family} is not configured in this topology"
        return self.pod4 if family == 4 else self.pod6

    def peer_ip(self, family: int) -> str:
        assert family in self.families, f"IPv{family} is not configured in this topology"
        return self.peer4 if family == 4 else self.peer6

    def peer_alt(self, family: int) -> str:
        """The peer's second address: another server on the same link."""
        return f"10.251.{self.n % 250 + 1}.3" if family == 4 else f"fd00:251:{self.n % 0xFFFF:x}::3"

    connect = staticmethod(connect)
    """sim.traffic.connect: a token from inside ns (as uid/gid when given); who answered."""

    def received(self, label: str) -> list[Received]:
        return [r for r in self.server.received if r.label == label]


def new_netns(topo: Topology, role: str) -> NamedNetns:
    """One more namespace for the topology (unique name), deleted with it."""
    ns = NamedNetns(f"ipnc-t{_PID}-{topo.n}-{role}")
    topo.extra.append(ns)
    return ns


def _build_topology(*, ipv4: bool = True) -> Topology:
    n = next(_SEQ)
    base = f"ipnc-t{_PID}-{n}"
    pod = NamedNetns(f"{base}-pod")
    try:
        peer = NamedNetns(f"{base}-peer")
    except BaseException:
        pod.delete()
        raise
    topo = Topology(n, pod, peer, ipv4)
    try:
        ip("-n", pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer.name)
        for ns, v4, v6 in ((pod, topo.pod4, topo.pod6), (peer, topo.peer4, topo.peer6)):
            ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")
            ns.sysctl("net.ipv6.conf.eth0.accept_ra", "0")
            ip("-n", ns.name, "link", "set", "lo", "up")
            if ipv4:
                ip("-n", ns.name, "addr", "add", f"{v4}/24", "dev", "eth0")
            ip("-n", ns.name, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            ip("-n", ns.name, "link", "set", "eth0", "up")
        # The second server address is never the peer's chosen source (IPv4 secondary, IPv6 deprecated).
        if ipv4:
            ip("-n", peer.name, "addr", "add", f"{topo.peer_alt(4)}/24", "dev", "eth0")
        ip(
            "-n",
            peer.name,
            "addr",
            "add",
            f"{topo.peer_alt(6)}/64",
            "dev",
            "eth0",
            "nodad",
            "preferred_lft",
            "0",
        )
        add = topo.server.add
        for port in (8080, 8081, 15008, 15020, 15021, 15090):
            add(pod, f"app:{port}", port)
        add(pod, "envoy-out:15001", 15001)
        add(pod, "envoy-in:15006", 15006, transparent=True)  # serves REDIRECT and TPROXY alike
        for port in (9090, 9091):
            add(peer, f"peer:{port}", port)
        # DNS servers answer from the address asked (as real ones do): one socket per address.
        for server4, server6 in (
            (topo.peer4, topo.peer6),
            (topo.peer_alt(4) if ipv4 else None, topo.peer_alt(6)),
        ):
            for proto, label in (("udp", "peer-dns:53"), ("tcp", "peer-dns-tcp:53")):
                add(peer, label, 53, proto, bind4=server4 if ipv4 else None, bind6=server6)
        topo.server.start()
        topo.agent = DnsAgent(pod, {f: topo.peer_ip(f) for f in topo.families})
    except BaseException:
        _destroy(topo)
        raise
    return topo


def _destroy(topo: Topology) -> None:
    errors = []
    agent_stop = topo.agent.stop if topo.agent is not None else (lambda: None)
    extra = [ns.delete for ns in topo.extra]
    for step in (agent_stop, topo.server.stop, topo.pod.delete, topo.peer.delete, *extra):
        try:
            step()
        except Exception as exc:  # keep cleaning; report afterwards
            errors.append(exc)
    if errors:
        raise errors[0]


# --- rule application --------------------------------------------------------------------------------------

BACKENDS: tuple[BackendChoice, ...] = ("legacy", "nft", "nftables")


def apply_rules(ns: NamedNetns, spec: InterceptSpec, backend: BackendChoice) -> ApplyResult:
    return dataplane.apply(ns.pinned, spec, backend)


def clean_rules(ns: NamedNetns, backend: BackendChoice) -> None:
    dataplane.clean(ns.pinned, backend)


def verify_rules(ns: NamedNetns, spec: InterceptSpec, backend: BackendChoice) -> Drift:
    return dataplane.verify(ns.pinned, spec, backend)


# --- fixtures ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def topology(*, ipv4: bool = True) -> Iterator[Topology]:
    """A fresh pod/peer pair with all listeners running; torn down (namespaces deleted) also on failure."""
    built = _build_topology(ipv4=ipv4)
    try:
        yield built
    finally:
        _destroy(built)


@pytest.fixture
def topo() -> Iterator[Topology]:
    """A fresh dual-stack pod/peer pair (see `topology`)."""
    with topology() as built:
        yield built


STACKS: dict[str, tuple[bool, int]] = {
    "dual-stack/4": (True, 4),
    "dual-stack/6": (True, 6),
    "ipv6-only": (False, 6),
}
"""Pod shapes the parity tests run in: (has IPv4, family the test's traffic uses)."""


@pytest.fixture(params=sorted(STACKS))
def stack(request: pytest.FixtureRequest) -> tuple[bool, int]:
    return STACKS[request.param]


@pytest.fixture
def stack_topo(stack: tuple[bool, int]) -> Iterator[Topology]:
    """A fresh pod/peer pair, dual-stack or IPv6-only (see `stack`)."""
    with topology(ipv4=stack[0]) as built:
        yield built


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> BackendChoice:
    choice: BackendChoice = request.param
    return choice


@dataclass
class Capture:
    """Applies a spec to the topology's pod with the test's backend."""

    topo: Topology
    backend: BackendChoice

    def apply(self, spec: InterceptSpec) -> ApplyResult:
        result = apply_rules(self.topo.pod, spec, self.backend)
        assert result.backend == self.backend, result
        return result

    def clean(self) -> None:
        clean_rules(self.topo.pod, self.backend)

    def verify(self, spec: InterceptSpec) -> Drift:
        return verify_rules(self.topo.pod, spec, self.backend)


@pytest.fixture
def capture(topo: Topology, backend: BackendChoice) -> Capture:
    return Capture(topo, backend)


@pytest.fixture
def stack_capture(stack_topo: Topology, backend: BackendChoice) -> Capture:
    return Capture(stack_topo, backend)


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_namespaces() -> Iterator[None]:
    yield
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    prefix = f"ipnc-t{_PID}-"
    leftover = [line.split()[0] for line in names.splitlines() if line.startswith(prefix)]
    for name in leftover:  # only ours: the prefix carries this process's pid
        ip("netns", "del", name)
    assert not leftover, f"namespaces left behind: {leftover}"


__all__ = [
    "APP_UID",
    "PROXY_ID",
    "Capture",
    "OriginalSrcEnvoy",
    "Received",
    "Reply",
    "Topology",
    "new_netns",
    "topology",
]
