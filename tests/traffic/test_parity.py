"""Istio parity in packets: DNS capture, TPROXY original source, KubeVirt interfaces, UDP port exclusions.

Each test names the Istio (`istio-iptables`) behaviour it pins, and runs for every backend in a dual-stack
pod (IPv4 and IPv6 traffic) and an IPv6-only pod (the `stack` fixture). The DNS proxy is a fake istio-agent
running as uid 1337 that answers after asking the peer's DNS server itself (traffic_harness.DnsAgent).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from traffic_harness import APP_UID, PROXY_ID, Capture, OriginalSrcEnvoy, Reply, Topology, new_netns

from ipnc_lab.sim.netns import NamedNetns, holds_capture_rules, ip
from istio_pod_network_controller.dataplane import apply as dataplane
from istio_pod_network_controller.dataplane.apply import BackendChoice
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import InterceptSpec, build_spec

pytestmark = pytest.mark.root

ENVOY_IN = "envoy-in:15006"
ENVOY_OUT = "envoy-out:15001"
AGENT = "dns-proxy:15053"
DNS = {ann.CAPTURE_DNS: "true"}


def spec(
    annotations: dict[str, str] | None = None, defaults: dict[str, str] | None = None, *, v6: bool = True
) -> InterceptSpec:
    return build_spec(annotations or {}, defaults).with_ipv6(v6)


def lands(reply: Reply, label: str) -> None:
    assert reply.ok, f"expected {label}, got {reply}"
    assert reply.token_ok, f"token not echoed: {reply}"
    assert reply.label == label, f"expected {label}, got {reply}"


def servers(*addresses: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    return tuple(ipaddress.ip_address(a) for a in addresses)


# --- DNS ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dns_round_trip_through_agent_with_zones_apart(
    stack_topo: Topology, stack_capture: Capture, stack: tuple[bool, int], proto: str
) -> None:
    """Istio DNS capture (resolv.conf's nameservers): the app's query to its nameserver goes to the agent on
    15053 (nat ISTIO_OUTPUT_DNS), and the agent's answer gets back to the app as if from the nameserver —
    for UDP only because raw ISTIO_OUTPUT_DNS puts the app's query in conntrack zone 2 with the agent's
    reply (sport 15053), while the agent's own upstream query (uid 1337, zone 1, answer zone 1 through
    raw PREROUTING) is not captured and reaches the real server."""
    topo, family = stack_topo, stack[1]
    nameserver = topo.peer_ip(family)
    stack_capture.apply(spec(DNS).with_dns_servers(servers(nameserver)))
    reply = topo.connect(topo.pod, nameserver, 53, proto, uid=APP_UID)
    lands(reply, AGENT)
    upstream = "peer-dns:53" if proto == "udp" else "peer-dns-tcp:53"
    assert reply.upstream == upstream, reply
    if proto == "tcp":
        assert reply.orig == (nameserver, 53)
    asked = topo.received(upstream)
    assert [r.source[0] for r in asked] == [topo.pod_ip(family)], "one upstream query, from the pod"


def test_dns_only_resolv_conf_servers_are_captured(
    stack_topo: Topology, stack_capture: Capture, stack: tuple[bool, int]
) -> None:
    """Istio sidecar default (no --capture-all-dns): only DNS to the pod's resolv.conf nameservers is
    redirected (`-d SERVER -j REDIRECT`), so a resolver the app asks directly is left alone; with
    capture-all every server is."""
    topo, family = stack_topo, stack[1]
    nameserver, other = topo.peer_ip(family), topo.peer_alt(family)
    stack_capture.apply(spec(DNS).with_dns_servers(servers(nameserver)))
    lands(topo.connect(topo.pod, nameserver, 53, "udp", uid=APP_UID), AGENT)
    direct = topo.connect(topo.pod, other, 53, "udp", uid=APP_UID)
    lands(direct, "peer-dns:53")
    assert direct.local == (other, 53)
    stack_capture.apply(spec(DNS, {"capture_all_dns": "true"}).with_dns_servers(servers(nameserver)))
    captured = topo.connect(topo.pod, other, 53, "udp", uid=APP_UID)
    lands(captured, AGENT)
    assert captured.upstream == "peer-dns:53"


def test_dns_capture_spares_the_proxy_and_a_nameserver_free_family(
    stack_topo: Topology, stack_capture: Capture, stack: tuple[bool, int]
) -> None:
    """Istio: the proxy uid/gid's own DNS is never captured (ISTIO_OUTPUT returns it before the DNS jump);
    with no nameserver of a family in resolv.conf that family's DNS is not captured at all."""
    topo, family = stack_topo, stack[1]
    nameserver = topo.peer_ip(family)
    stack_capture.apply(spec(DNS).with_dns_servers(servers(nameserver)))
    for proto, label in (("udp", "peer-dns:53"), ("tcp", "peer-dns-tcp:53")):
        lands(topo.connect(topo.pod, nameserver, 53, proto, uid=PROXY_ID, gid=PROXY_ID), label)
        lands(topo.connect(topo.pod, nameserver, 53, proto, uid=APP_UID, gid=PROXY_ID), label)
    if topo.ipv4:
        other_family = 6 if family == 4 else 4
        lands(topo.connect(topo.pod, topo.peer_ip(other_family), 53, "udp", uid=APP_UID), "peer-dns:53")


def test_dns_not_captured_when_port_53_excluded(
    stack_topo: Topology, stack_capture: Capture, stack: tuple[bool, int]
) -> None:
    """Istio excludeOutboundPorts: `-p tcp --dport N -j RETURN` and `-p udp --dport N -j RETURN` come first
    in ISTIO_OUTPUT, before the jump to ISTIO_OUTPUT_DNS, so excluding 53 exempts DNS over UDP and TCP."""
    topo, family = stack_topo, stack[1]
    nameserver = topo.peer_ip(family)
    stack_capture.apply(spec({**DNS, ann.EXCLUDE_OUTBOUND_PORTS: "53"}).with_dns_servers(servers(nameserver)))
    udp = topo.connect(topo.pod, nameserver, 53, "udp", uid=APP_UID)
    lands(udp, "peer-dns:53")
    assert udp.local == (nameserver, 53)
    lands(topo.connect(topo.pod, nameserver, 53, "tcp", uid=APP_UID), "peer-dns-tcp:53")
    lands(topo.connect(topo.pod, nameserver, 9090, uid=APP_UID), ENVOY_OUT)


@pytest.mark.parametrize("nameserver", ["127.0.0.53", "::1"])
def test_dns_to_a_loopback_nameserver_is_captured(topo: Topology, capture: Capture, nameserver: str) -> None:
    """Istio: with DNS capture the lo RETURN becomes `-o lo -p tcp ! --dport 53 ! --uid-owner 1337`, so
    the app's TCP DNS to a nameserver on loopback (a node-local resolver address) still reaches the agent,
    while other loopback traffic stays direct."""
    capture.apply(spec(DNS).with_dns_servers(servers(nameserver)))
    reply = topo.connect(topo.pod, nameserver, 53, "tcp", uid=APP_UID)
    lands(reply, AGENT)
    assert reply.orig == (nameserver, 53)
    assert reply.upstream == "peer-dns-tcp:53"
    loopback = "::1" if ":" in nameserver else "127.0.0.1"
    lands(topo.connect(topo.pod, loopback, 8080, uid=APP_UID), "app:8080")


# --- TPROXY ------------------------------------------------------------------------------------------------

TPROXY = {ann.INTERCEPTION_MODE: "TPROXY"}
ORIGSRC_PORT = 15106


def test_tproxy_original_source_round_trip(
    stack_topo: Topology, stack_capture: Capture, stack: tuple[bool, int]
) -> None:
    """Istio TPROXY with original_src: the inbound listener (IP_TRANSPARENT) sees the client's own address,
    connects to the app *from* it with mark 1337; PREROUTING saves that mark on the connection
    (CONNMARK --save-mark), mangle OUTPUT restores it on the app's replies to the spoofed source
    (--restore-mark) and the fwmark-1337 route delivers them locally, back to Envoy, end to end."""
    topo, family = stack_topo, stack[1]
    stack_capture.apply(spec(TPROXY, {"inbound_port": str(ORIGSRC_PORT)}))
    envoy = OriginalSrcEnvoy(topo.pod, ORIGSRC_PORT, topo.families)
    try:
        pod, peer = topo.pod_ip(family), topo.peer_ip(family)
        reply = topo.connect(topo.peer, pod, 8080, src=peer)
        lands(reply, "origsrc-envoy")
        assert reply.upstream == "app:8080", reply
        assert reply.local == (pod, 8080), "the TPROXY listener's local address is the original destination"
        assert envoy.seen and envoy.seen[-1][0][0] == peer, "Envoy saw the client's own address"
        (app_saw,) = topo.received("app:8080")
        assert app_saw.source[0] == peer, "the app saw the client's original source"
        hbone = topo.connect(topo.peer, pod, 15008, src=peer)
        lands(hbone, "origsrc-envoy")  # no 15008 exemption in TPROXY mode, as in Istio
        assert hbone.upstream == "app:15008"
    finally:
        envoy.stop()


def test_tproxy_loopback_rules(stack_topo: Topology, stack_capture: Capture, stack: tuple[bool, int]) -> None:
    """Istio TPROXY: lo traffic is returned from mangle ISTIO_INBOUND unless the proxy marked it 1338
    (MARK --set-mark 1338 for uid/gid 1337 to a non-loopback address), and 127.0.0.6/::6 is returned:
    passthrough reaches the app, the proxy calling its pod IP reaches the inbound listener, the app
    calling its own pod IP reaches itself."""
    topo, family = stack_topo, stack[1]
    stack_capture.apply(spec(TPROXY))
    pod = topo.pod_ip(family)
    passthrough = "127.0.0.6" if family == 4 else "::6"
    lands(topo.connect(topo.pod, pod, 8080, uid=PROXY_ID, gid=PROXY_ID, src=passthrough), "app:8080")
    hairpin = topo.connect(topo.pod, pod, 8080, uid=PROXY_ID, gid=PROXY_ID)
    lands(hairpin, ENVOY_IN)
    assert hairpin.orig == (pod, 8080)
    lands(topo.connect(topo.pod, pod, 8080, uid=APP_UID), "app:8080")
    lands(topo.connect(topo.pod, topo.peer_ip(family), 9090, uid=APP_UID), ENVOY_OUT)


# --- outbound-only -----------------------------------------------------------------------------------------


def test_outbound_only_keeps_the_proxy_loopback_path(
    stack_topo: Topology, stack_capture: Capture, stack: tuple[bool, int]
) -> None:
    """Istio includeInboundPorts="": the uid/gid 1337 `-o lo ! -d LOOPBACK -j ISTIO_IN_REDIRECT` rules stay,
    so Envoy calling its own pod IP reaches 15006 (what the waiter's outbound-only probe relies on), while
    nothing from outside is captured inbound."""
    topo, family = stack_topo, stack[1]
    stack_capture.apply(spec({ann.INCLUDE_INBOUND_PORTS: ""}))
    pod = topo.pod_ip(family)
    reply = topo.connect(topo.pod, pod, 8080, uid=PROXY_ID, gid=PROXY_ID)
    lands(reply, ENVOY_IN)
    assert reply.orig == (pod, 8080)
    lands(topo.connect(topo.peer, pod, 8080), "app:8080")


# --- KubeVirt ----------------------------------------------------------------------------------------------


def _vm(topo: Topology) -> NamedNetns:
    """A KubeVirt-style VM namespace behind the pod's `vnet0` (a veth: `dummy` is missing here)."""
    vm = new_netns(topo, "vm")
    n = topo.n % 250 + 1
    pod_side = {4: f"10.252.{n}.1", 6: f"fd00:252:{n:x}::1"}
    vm_side = {4: f"10.252.{n}.2", 6: f"fd00:252:{n:x}::2"}
    ip("-n", topo.pod.name, "link", "add", "vnet0", "type", "veth", "peer", "name", "eth0", "netns", vm.name)
    for ns, link, addrs in ((topo.pod, "vnet0", pod_side), (vm, "eth0", vm_side)):
        ns.sysctl(f"net.ipv6.conf.{link}.accept_dad", "0")
        ip("-n", ns.name, "link", "set", "lo", "up")
        for family in topo.families:
            ip(
                "-n",
                ns.name,
                "addr",
                "add",
                f"{addrs[family]}/{24 if family == 4 else 64}",
                "dev",
                link,
                "nodad",
            )
        ip("-n", ns.name, "link", "set", link, "up")
    for family in topo.families:  # the VM reaches the pod's and the peer's addresses through the pod
        for dst in (topo.pod_ip(family), topo.peer_ip(family)):
            ip("-n", vm.name, f"-{family}", "route", "add", dst, "via", pod_side[family], "dev", "eth0")
    return vm


@pytest.mark.parametrize("ranges", ["list", "*"])
def test_kubevirt_interface_with_outbound_ranges(
    stack_topo: Topology, stack_capture: Capture, stack: tuple[bool, int], ranges: str
) -> None:
    """Istio reroute-virtual-interfaces: TCP from the VM's interface to the included ranges goes to the
    outbound listener (`-i vnet0 -d CIDR -j ISTIO_REDIRECT`, or all of it for `*`), and the rest passes
    (`-i vnet0 -j RETURN`) instead of falling into inbound capture; other interfaces keep inbound capture."""
    topo, family = stack_topo, stack[1]
    vm = _vm(topo)
    peer, pod = topo.peer_ip(family), topo.pod_ip(family)
    include = ",".join(f"{topo.peer_ip(f)}/{32 if f == 4 else 128}" for f in topo.families)
    stack_capture.apply(
        spec(
            {
                ann.REROUTE_VIRTUAL_INTERFACES: "vnet0",
                ann.INCLUDE_OUTBOUND_IP_RANGES: include if ranges == "list" else "*",
            }
        )
    )
    from_vm = topo.connect(vm, peer, 9090)
    lands(from_vm, ENVOY_OUT)
    assert from_vm.orig == (peer, 9090)
    to_pod = topo.connect(vm, pod, 8080)
    if ranges == "list":
        lands(to_pod, "app:8080")
        assert to_pod.local == (pod, 8080)
    else:
        lands(to_pod, ENVOY_OUT)
        assert to_pod.orig == (pod, 8080)
    lands(topo.connect(topo.peer, pod, 8080), ENVOY_IN)


@pytest.fixture
def chrooted_pod_process(stack_topo: Topology, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A process in the pod's namespace whose root is a tenant directory (its /proc/PID/root), by PID."""
    root = tmp_path / "container-root"
    (root / "etc").mkdir(parents=True)

    def spawn() -> int:
        pid = os.fork()
        if pid == 0:  # the child: only async-signal-safe work, then wait to be killed
            try:
                os.chroot(root)
                os.chdir("/")
                while True:
                    signal.pause()
            finally:
                os._exit(0)
        return pid

    pid = stack_topo.pod.run(spawn)
    try:
        deadline = time.monotonic() + 30
        while os.readlink(f"/proc/{pid}/root") != str(root):  # the child has not chrooted yet
            assert time.monotonic() < deadline, "the pod process never entered its root"
            time.sleep(0.01)
        yield pid, root
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_apply_limits_dns_capture_to_the_pods_resolv_conf(
    stack_topo: Topology,
    backend: BackendChoice,
    stack: tuple[bool, int],
    chrooted_pod_process: tuple[int, Path],
) -> None:
    """Istio's sidecar reads the pod's /etc/resolv.conf: the data plane reads it through a pod process's
    /proc/PID/root (a symlink into the node is not followed out), and DNS to those nameservers only is
    captured; before any process has the file, capture-all (Istio CNI's form) stands in."""
    topo, family = stack_topo, stack[1]
    pid, root = chrooted_pod_process
    nameserver, other = topo.peer_ip(family), topo.peer_alt(family)
    (root / "etc" / "resolv.conf").write_text(f"search cluster.local\nnameserver {nameserver}\n")
    wanted = spec(DNS)
    dataplane.apply(topo.pod.pinned, wanted, backend, pod_pids=[pid])
    lands(topo.connect(topo.pod, nameserver, 53, "udp", uid=APP_UID), AGENT)
    lands(topo.connect(topo.pod, other, 53, "udp", uid=APP_UID), "peer-dns:53")
    assert dataplane.verify(topo.pod.pinned, wanted, backend, pod_pids=[pid]).in_place
    assert not dataplane.verify(topo.pod.pinned, wanted, backend).in_place, "without the file: capture-all"
    dataplane.apply(topo.pod.pinned, wanted, backend)
    lands(topo.connect(topo.pod, other, 53, "udp", uid=APP_UID), AGENT)


@pytest.mark.parametrize(
    "annotations",
    [
        {**TPROXY, **DNS, ann.EXCLUDE_OUTBOUND_PORTS: "5432", ann.INCLUDE_INBOUND_PORTS: "8080,9090"},
        {
            **DNS,
            ann.REROUTE_VIRTUAL_INTERFACES: "vnet0",
            ann.INCLUDE_OUTBOUND_IP_RANGES: "10.96.0.0/12,fd00::/8",
        },
        {**TPROXY, ann.INCLUDE_INBOUND_PORTS: ""},
    ],
    ids=["tproxy-dns-lists", "kubevirt-dns-ranges", "tproxy-outbound-only"],
)
def test_parity_rules_verify_in_place_and_clean_away(
    topo: Topology, capture: Capture, annotations: dict[str, str]
) -> None:
    """The new rule forms (multiport, marks, connmarks, CT zones per server) read back equal to what was
    applied, so verify finds no drift; clean leaves nothing of ours."""
    wanted = spec(annotations).with_dns_servers(servers(topo.peer4, topo.peer6))
    capture.apply(wanted)
    drift = capture.verify(wanted)
    assert drift.in_place, drift.report
    capture.apply(wanted)
    assert capture.verify(wanted).in_place
    capture.clean()
    assert not holds_capture_rules(topo.pod)
