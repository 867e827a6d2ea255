"""Traffic harness: real TCP/UDP through real capture rules, between two throw-away network namespaces.

Topology (one per test, so every test starts from a fresh, empty netfilter and conntrack state):

    pod netns   eth0 10.251.N.1/24 fd00:251:N::1/64  ==veth==  eth0 10.251.N.2/24 fd00:251:N::2/64   peer

Both ends of the veth are created inside the namespaces (nothing appears in the host namespace), there is
no default route and forwarding stays off, so no packet can leave the pair.

Recording listeners (created inside a namespace from a thread that entered it, then served from one
ordinary thread; a socket keeps its namespace) answer every TCP connection / UDP datagram with one JSON
line: the listener's label ("app:8080", "envoy-out:15001", "envoy-in:15006", ...), the token the client
sent, the original destination (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST) and getsockname(), which for a
TPROXY (IP_TRANSPARENT) listener is the original destination.

Clients run inside a namespace either in-process (root, the default) or, when a uid/gid is given, as a
short `python -I -S -c` subprocess started from a thread inside the namespace with subprocess's
user/group/extra_groups (argument lists only), so the owner match sees exactly that uid/gid.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from istio_pod_network_controller.dataplane import apply as dataplane
from istio_pod_network_controller.dataplane.apply import ApplyResult, BackendChoice, Drift
from istio_pod_network_controller.dataplane.netns import PinnedNetns, run_in
from istio_pod_network_controller.spec import InterceptSpec

T = TypeVar("T")
_SEQ = itertools.count(1)
_PID = os.getpid()
PYTHON = os.path.realpath(sys.executable)  # the system interpreter; -I -S needs nothing from the venv
CLIENT_TIMEOUT = 2.0
CLIENT_ATTEMPTS = 2  # a retry only after a timeout; refusals are answers
APP_UID = 1000
PROXY_ID = 1337

SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST on SOL_IPV6 has the same number
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

# One probe implementation for both the in-process client and the uid/gid subprocess client.
CLIENT_SRC = r"""
import errno, json, socket, sys

def probe(a):
    fam = socket.AF_INET6 if ":" in a["dst"] else socket.AF_INET
    tcp = a["proto"] == "tcp"
    s = socket.socket(fam, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        s.settimeout(a["timeout"])
        if a.get("src"):
            s.bind((a["src"], 0))
        s.connect((a["dst"], a["port"]))
        s.sendall(a["token"].encode() + b"\n")
        data = b""
        if tcp:
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        else:
            data = s.recv(65535)
        if not data:
            return {"ok": False, "error": "EOF"}
        return {"ok": True, "reply": json.loads(data), "client": list(s.getsockname()[:2])}
    except socket.timeout:
        return {"ok": False, "error": "timeout"}
    except OSError as exc:
        return {"ok": False, "error": errno.errorcode.get(exc.errno or 0, str(exc))}
    finally:
        s.close()

if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
"""
_CLIENT_NS: dict[str, Any] = {"__name__": "traffic_client"}
exec(compile(CLIENT_SRC, "<traffic client>", "exec"), _CLIENT_NS)  # noqa: S102 - our own constant source
_probe: Callable[[dict[str, Any]], dict[str, Any]] = _CLIENT_NS["probe"]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


# --- namespaces --------------------------------------------------------------------------------------------


class Netns:
    """A named namespace (`ip netns add`), pinned by fd for run_in; delete() removes it."""

    def __init__(self, name: str) -> None:
        self.name = name
        _ip("netns", "add", name)
        try:
            self.pinned = PinnedNetns.open_path(f"/run/netns/{name}")
        except BaseException:
            _ip("netns", "del", name)
            raise

    def run(self, work: Callable[[], T]) -> T:
        return run_in(self.pinned, work)

    def exec(self, argv: list[str], stdin: str | None = None, timeout: float = 10) -> str:
        """Run a tool inside the namespace (spawned from a thread that entered it); stdout, or raise."""

        def work() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )

        done = self.run(work)
        if done.returncode != 0:
            raise RuntimeError(f"{argv} in {self.name}: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def sysctl(self, key: str, value: str) -> None:
        def work() -> None:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

        self.run(work)

    def delete(self) -> None:
        self.pinned.close()
        _ip("netns", "del", self.name)


# --- replies -----------------------------------------------------------------------------------------------


def _addr(value: list[Any] | None) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if value else None


@dataclass(frozen=True)
class Reply:
    """What a client saw: who answered (label) and the addresses the listener reported, or an error."""

    ok: bool
    error: str | None = None
    label: str | None = None
    orig: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    client: tuple[str, int] | None = None
    token_ok: bool = False

    @classmethod
    def parse(cls, raw: dict[str, Any], token: str) -> Reply:
        if not raw.get("ok"):
            return cls(False, error=str(raw.get("error")))
        body = raw["reply"]
        return cls(
            True,
            label=body.get("label"),
            orig=_addr(body.get("orig")),
            local=_addr(body.get("local")),
            client=_addr(raw.get("client")),
            token_ok=body.get("token") == token,
        )

    def __str__(self) -> str:
        if not self.ok:
            return f"<error {self.error}>"
        return f"<{self.label} orig={self.orig} local={self.local} from={self.client}>"


# --- listeners ---------------------------------------------------------------------------------------------


def _unpack_original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """SO_ORIGINAL_DST (IPv4, sockaddr_in) or IP6T_SO_ORIGINAL_DST (IPv6, sockaddr_in6); None if unknown."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return socket.inet_ntop(socket.AF_INET, packed), port
        raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    except OSError:
        return None  # ENOENT: no conntrack entry in this namespace (nothing was NATed)


@dataclass
class Received:
    label: str
    proto: str
    token: str
    source: tuple[str, int]
    orig: tuple[str, int] | None
    local: tuple[str, int]


@dataclass
class _Listen:
    sock: socket.socket
    label: str
    proto: str


class Server:
    """One thread serving every listening socket of a topology; records what each listener received."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.received: list[Received] = []
        self._listens: list[_Listen] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(
        self,
        ns: Netns,
        label: str,
        port: int,
        proto: str = "tcp",
        *,
        bind4: str | None = "0.0.0.0",
        bind6: str | None = "::",
        transparent: bool = False,
    ) -> None:
        """Listen on port in ns (IPv4 and/or IPv6 sockets, created on a thread inside ns)."""

        def make(family: socket.AddressFamily, host: str) -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if transparent:
                    if family == socket.AF_INET:
                        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                    else:
                        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
                sock.bind((host, port))
                if proto == "tcp":
                    sock.listen(16)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock

        for family, host in ((socket.AF_INET, bind4), (socket.AF_INET6, bind6)):
            if host is None:
                continue
            sock = ns.run(lambda f=family, h=host: make(f, h))  # type: ignore[misc]
            listen = _Listen(sock, label, proto)
            self._listens.append(listen)
            self.selector.register(sock, selectors.EVENT_READ, listen)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="traffic-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.05):
                listen: _Listen = key.data
                try:
                    if listen.proto == "tcp":
                        self._serve_tcp(listen)
                    else:
                        self._serve_udp(listen)
                except OSError:
                    continue  # a client that went away; it reports its own error

    def _answer(self, listen: _Listen, token: str, source: Any, orig: Any, local: Any) -> bytes:
        entry = Received(listen.label, listen.proto, token, tuple(source[:2]), orig, tuple(local[:2]))
        self.received.append(entry)
        body = {"label": listen.label, "token": token, "orig": orig, "local": list(local[:2])}
        return json.dumps(body).encode() + b"\n"

    def _serve_tcp(self, listen: _Listen) -> None:
        try:
            conn, source = listen.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            data = b""
            while not data.endswith(b"\n") and len(data) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            orig = _unpack_original_dst(conn)
            conn.sendall(self._answer(listen, data.decode().strip(), source, orig, conn.getsockname()))

    def _serve_udp(self, listen: _Listen) -> None:
        try:
            data, source = listen.sock.recvfrom(65535)
        except BlockingIOError:
            return
        answer = self._answer(listen, data.decode().strip(), source, None, listen.sock.getsockname())
        listen.sock.sendto(answer, source)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for listen in self._listens:
            self.selector.unregister(listen.sock)
            listen.sock.close()
        self._listens.clear()
        self.selector.close()


# --- topology ----------------------------------------------------------------------------------------------


@dataclass
class Topology:
    """pod + peer namespaces joined by a veth pair, with recording listeners and a client helper."""

    n: int
    pod: Netns
    peer: Netns
    server: Server = field(default_factory=Server)

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
        return self.pod4 if family == 4 else self.pod6

    def peer_ip(self, family: int) -> str:
        return self.peer4 if family == 4 else self.peer6

    def connect(
        self,
        ns: Netns,
        dst: str,
        port: int,
        proto: str = "tcp",
        *,
        uid: int | None = None,
        gid: int | None = None,
        src: str | None = None,
    ) -> Reply:
        """Send a random token from inside ns (as uid/gid when given) and return who answered."""
        token = secrets.token_hex(8)
        args = {
            "dst": dst,
            "port": port,
            "proto": proto,
            "token": token,
            "src": src,
            "timeout": CLIENT_TIMEOUT,
        }
        raw: dict[str, Any] = {"ok": False, "error": "not run"}
        for _ in range(CLIENT_ATTEMPTS):
            raw = ns.run(lambda: self._client(args, uid, gid))
            if raw.get("ok") or raw.get("error") != "timeout":
                break
        return Reply.parse(raw, token)

    @staticmethod
    def _client(args: dict[str, Any], uid: int | None, gid: int | None) -> dict[str, Any]:
        if uid is None and gid is None:
            return _probe(args)
        done = subprocess.run(
            [PYTHON, "-I", "-S", "-c", CLIENT_SRC, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT + 3,
            check=False,
            cwd="/",
            user=uid if uid is not None else 0,
            group=gid if gid is not None else (uid if uid is not None else 0),
            extra_groups=[],
            env={"PATH": "/usr/bin:/bin"},
        )
        if done.returncode != 0 or not done.stdout.strip():
            return {"ok": False, "error": f"client exit {done.returncode}: {done.stderr.strip()[-300:]}"}
        return dict(json.loads(done.stdout))

    def received(self, label: str) -> list[Received]:
        return [r for r in self.server.received if r.label == label]


def _build_topology() -> Topology:
    n = next(_SEQ)
    base = f"ipnc-t{_PID}-{n}"
    pod = Netns(f"{base}-pod")
    try:
        peer = Netns(f"{base}-peer")
    except BaseException:
        pod.delete()
        raise
    topo = Topology(n, pod, peer)
    try:
        _ip("-n", pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer.name)
        for ns, v4, v6 in ((pod, topo.pod4, topo.pod6), (peer, topo.peer4, topo.peer6)):
            ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")
            ns.sysctl("net.ipv6.conf.eth0.accept_ra", "0")
            _ip("-n", ns.name, "link", "set", "lo", "up")
            _ip("-n", ns.name, "addr", "add", f"{v4}/24", "dev", "eth0")
            _ip("-n", ns.name, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            _ip("-n", ns.name, "link", "set", "eth0", "up")
        add = topo.server.add
        for port in (8080, 8081, 15008, 15020, 15021, 15090):
            add(pod, f"app:{port}", port)
        add(pod, "envoy-out:15001", 15001)
        add(pod, "envoy-in:15006", 15006, transparent=True)  # serves REDIRECT and TPROXY alike
        # Istio's DNS proxy listens on loopback: replies then leave from the address REDIRECT mapped to.
        add(pod, "dns-proxy:15053", 15053, "udp", bind4="127.0.0.1", bind6="::1")
        add(pod, "dns-proxy-tcp:15053", 15053, "tcp", bind4="127.0.0.1", bind6="::1")
        for port in (9090, 9091):
            add(peer, f"peer:{port}", port)
        add(peer, "peer-dns:53", 53, "udp")
        add(peer, "peer-dns-tcp:53", 53, "tcp")
        topo.server.start()
    except BaseException:
        _destroy(topo)
        raise
    return topo


def _destroy(topo: Topology) -> None:
    errors = []
    for step in (topo.server.stop, topo.pod.delete, topo.peer.delete):
        try:
            step()
        except Exception as exc:  # keep cleaning; report afterwards
            errors.append(exc)
    if errors:
        raise errors[0]


# --- rule application --------------------------------------------------------------------------------------

BACKENDS: tuple[BackendChoice, ...] = ("legacy", "nft", "nftables")


def apply_rules(ns: Netns, spec: InterceptSpec, backend: BackendChoice) -> ApplyResult:
    return dataplane.apply(ns.pinned, spec, backend)


def clean_rules(ns: Netns, backend: BackendChoice) -> None:
    dataplane.clean(ns.pinned, backend)


def verify_rules(ns: Netns, spec: InterceptSpec, backend: BackendChoice) -> Drift:
    return dataplane.verify(ns.pinned, spec, backend)


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture
def topo() -> Iterator[Topology]:
    """A fresh pod/peer pair with all listeners running; torn down (namespaces deleted) also on failure."""
    topology = _build_topology()
    try:
        yield topology
    finally:
        _destroy(topology)


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


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_namespaces() -> Iterator[None]:
    yield
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    prefix = f"ipnc-t{_PID}-"
    leftover = [line.split()[0] for line in names.splitlines() if line.startswith(prefix)]
    for name in leftover:  # only ours: the prefix carries this process's pid
        _ip("netns", "del", name)
    assert not leftover, f"namespaces left behind: {leftover}"


__all__ = ["APP_UID", "PROXY_ID", "Capture", "Reply", "Topology", "errno"]
