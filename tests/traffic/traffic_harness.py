"""Traffic harness: real TCP/UDP through real capture rules, between two throw-away network namespaces.

Topology (one per test, so every test starts from a fresh, empty netfilter and conntrack state):

    pod netns   eth0 10.251.N.1/24 fd00:251:N::1/64  ==veth==  eth0 10.251.N.2/24 fd00:251:N::2/64   peer

Both ends of the veth are created inside the namespaces (nothing appears in the host namespace), there is
no default route and forwarding stays off, so no packet can leave the pair.

Listeners and clients come from `ipnc_lab.sim.traffic` (shared with the demo).
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ipnc_lab.sim.netns import NamedNetns, ip
from ipnc_lab.sim.traffic import Received, Reply, Server, connect
from istio_pod_network_controller.dataplane import apply as dataplane
from istio_pod_network_controller.dataplane.apply import ApplyResult, BackendChoice, Drift
from istio_pod_network_controller.settings.spec import InterceptSpec

_SEQ = itertools.count(1)
_PID = os.getpid()
APP_UID = 1000
PROXY_ID = 1337


# --- topology ----------------------------------------------------------------------------------------------


@dataclass
class Topology:
    """pod + peer namespaces joined by a veth pair, with recording listeners and a client helper."""

    n: int
    pod: NamedNetns
    peer: NamedNetns
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

    connect = staticmethod(connect)
    """sim.traffic.connect: a token from inside ns (as uid/gid when given); who answered."""

    def received(self, label: str) -> list[Received]:
        return [r for r in self.server.received if r.label == label]


def _build_topology() -> Topology:
    n = next(_SEQ)
    base = f"ipnc-t{_PID}-{n}"
    pod = NamedNetns(f"{base}-pod")
    try:
        peer = NamedNetns(f"{base}-peer")
    except BaseException:
        pod.delete()
        raise
    topo = Topology(n, pod, peer)
    try:
        ip("-n", pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer.name)
        for ns, v4, v6 in ((pod, topo.pod4, topo.pod6), (peer, topo.peer4, topo.peer6)):
            ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")
            ns.sysctl("net.ipv6.conf.eth0.accept_ra", "0")
            ip("-n", ns.name, "link", "set", "lo", "up")
            ip("-n", ns.name, "addr", "add", f"{v4}/24", "dev", "eth0")
            ip("-n", ns.name, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            ip("-n", ns.name, "link", "set", "eth0", "up")
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


def apply_rules(ns: NamedNetns, spec: InterceptSpec, backend: BackendChoice) -> ApplyResult:
    return dataplane.apply(ns.pinned, spec, backend)


def clean_rules(ns: NamedNetns, backend: BackendChoice) -> None:
    dataplane.clean(ns.pinned, backend)


def verify_rules(ns: NamedNetns, spec: InterceptSpec, backend: BackendChoice) -> Drift:
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
        ip("netns", "del", name)
    assert not leftover, f"namespaces left behind: {leftover}"


__all__ = ["APP_UID", "PROXY_ID", "Capture", "Received", "Reply", "Topology"]
