"""istio-iptables' outbound owner groups and --drop-invalid, proven with real packets on every backend.

Owner groups: connections from the pod as the same app uid under different gids; only the groups the spec
captures reach the outbound capture port, the others reach the peer directly.

Drop-invalid: the peer sends, through a raw socket, a TCP FIN|ACK that belongs to no connection (conntrack
finds it INVALID, as it does an out-of-window segment), then a SYN as a marker on the same path. A raw TCP
socket in the pod sees every TCP packet the pod accepts; once it has seen the marker it is drained. Without
drop-invalid the invalid packet is among what it saw, with drop-invalid it never is.
"""

from __future__ import annotations

import ipaddress
import itertools
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from traffic_harness import APP_UID, PROXY_ID, Capture, Reply, Topology

from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import InterceptSpec, build_spec

pytestmark = pytest.mark.root

ENVOY_OUT = "envoy-out:15001"
OTHER_GID = 2000
FIN_ACK, SYN = 0x11, 0x02
MARKER_PORT = 15021
"""An inbound port never captured (Istio's health port): the marker SYN reaches the pod's stack as it is."""
_SPORTS = itertools.count(41000)


def spec(settings: dict[str, str]) -> InterceptSpec:
    """A spec from controller-wide settings (these features have no pod annotation), IPv6 captured."""
    return build_spec({}, settings).with_ipv6(True)


def lands(reply: Reply, label: str) -> None:
    assert reply.ok, f"expected {label}, got {reply}"
    assert reply.token_ok, f"token not echoed: {reply}"
    assert reply.label == label, f"expected {label}, got {reply}"


def _from(topo: Topology, family: int, gid: int) -> Reply:
    return topo.connect(topo.pod, topo.peer_ip(family), 9090, uid=APP_UID, gid=gid)


# --- outbound owner groups ---------------------------------------------------------------------------------


def test_listed_group_is_captured_and_another_is_not(topo: Topology, capture: Capture) -> None:
    listed = spec({"outbound_owner_groups": f"{OTHER_GID},3000"})
    capture.apply(listed)
    for family in (4, 6):
        captured = _from(topo, family, OTHER_GID)
        lands(captured, ENVOY_OUT)
        assert captured.orig == (topo.peer_ip(family), 9090)
        lands(_from(topo, family, APP_UID), "peer:9090")
    # The proxy's own exemption still comes first.
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=PROXY_ID, gid=PROXY_ID), "peer:9090")
    drift = capture.verify(listed)
    assert drift.in_place, drift.report


def test_excluded_group_is_not_captured_and_another_is(topo: Topology, capture: Capture) -> None:
    capture.apply(spec({"outbound_owner_groups_exclude": str(OTHER_GID)}))
    for family in (4, 6):
        lands(_from(topo, family, OTHER_GID), "peer:9090")
        captured = _from(topo, family, APP_UID)
        lands(captured, ENVOY_OUT)
        assert captured.orig == (topo.peer_ip(family), 9090)
    drift = capture.verify(spec({"outbound_owner_groups_exclude": str(OTHER_GID)}))
    assert drift.in_place, drift.report


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_owner_groups_apply_to_dns_capture(topo: Topology, capture: Capture, proto: str) -> None:
    """Istio puts the owner-group RETURN before the jump to ISTIO_OUTPUT_DNS: an uncaptured group's DNS
    reaches the nameserver itself (its answer too, though raw's zones split query and answer), a captured
    group's goes to the DNS proxy."""
    nameserver = ipaddress.ip_address(topo.peer4)
    dns = build_spec({ann.CAPTURE_DNS: "true"}, {"outbound_owner_groups_exclude": str(OTHER_GID)})
    capture.apply(dns.with_ipv6(True).with_dns_servers((nameserver,)))
    direct = topo.connect(topo.pod, topo.peer4, 53, proto, uid=APP_UID, gid=OTHER_GID)
    lands(direct, "peer-dns:53" if proto == "udp" else "peer-dns-tcp:53")
    assert direct.local == (topo.peer4, 53)
    lands(topo.connect(topo.pod, topo.peer4, 53, proto, uid=APP_UID, gid=APP_UID), "dns-proxy:15053")


# --- drop-invalid ------------------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _segment(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    """A TCP header with a correct checksum (a bad one would be INVALID for a reason of its own)."""
    header = struct.pack("!HHIIBBHHH", sport, dport, 0x1000, 0x2000, 5 << 4, flags, 64240, 0, 0)
    source, destination = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(source) == 4:
        pseudo = source + destination + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    else:
        pseudo = source + destination + struct.pack("!I3xB", len(header), socket.IPPROTO_TCP)
    checksum = _checksum(pseudo + header)
    return header[:16] + struct.pack("!H", checksum) + header[18:]


def _raw_tcp(family: int) -> socket.socket:
    return socket.socket(
        socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP
    )


def _seen(pod_sock: socket.socket, family: int, peer: str) -> Iterator[tuple[int, int]]:
    """(source port, flags) of each TCP packet from `peer` the pod's raw socket holds now, without waiting."""
    while select.select([pod_sock], [], [], 0)[0]:
        data, address = pod_sock.recvfrom(65535)
        if address[0] != peer:
            continue
        tcp = data[(data[0] & 0x0F) * 4 :] if family == 4 else data  # IPv4 raw sockets get the IP header
        yield struct.unpack("!H", tcp[:2])[0], tcp[13]


def _invalid_packet_reaches_the_pod(topo: Topology, family: int) -> bool:
    """Send an unsolicited FIN|ACK then a marker SYN; wait for the marker in the pod; was the FIN seen?"""
    peer, pod = topo.peer_ip(family), topo.pod_ip(family)
    invalid_port, marker_port = next(_SPORTS), next(_SPORTS)
    with (
        topo.pod.run(lambda: _raw_tcp(family)) as pod_sock,
        topo.peer.run(lambda: _raw_tcp(family)) as peer_sock,
    ):
        peer_sock.bind((peer, 0))
        peer_sock.sendto(_segment(peer, pod, invalid_port, 8080, FIN_ACK), (pod, 0))
        peer_sock.sendto(_segment(peer, pod, marker_port, MARKER_PORT, SYN), (pod, 0))
        seen: list[tuple[int, int]] = []
        deadline = time.monotonic() + 10
        while (marker_port, SYN) not in seen:
            assert time.monotonic() < deadline, f"the marker SYN never reached the pod: {seen}"
            select.select([pod_sock], [], [], 0.5)
            seen += _seen(pod_sock, family, peer)
        return (invalid_port, FIN_ACK) in seen


@pytest.mark.parametrize("family", [4, 6])
def test_invalid_packet_is_dropped_only_with_drop_invalid(
    topo: Topology, capture: Capture, family: int
) -> None:
    capture.apply(spec({}))
    assert _invalid_packet_reaches_the_pod(topo, family), "without drop-invalid the pod must see the packet"
    dropping = spec({"drop_invalid": "true"})
    capture.apply(dropping)
    assert not _invalid_packet_reaches_the_pod(topo, family), "conntrack INVALID must be dropped"
    drift = capture.verify(dropping)
    assert drift.in_place, drift.report
    # Valid traffic is untouched: inbound capture and the app's outbound still work.
    lands(topo.connect(topo.peer, topo.pod_ip(family), 8080), "envoy-in:15006")
    lands(topo.connect(topo.pod, topo.peer_ip(family), 9090, uid=APP_UID), ENVOY_OUT)
    capture.apply(spec({}))
    assert _invalid_packet_reaches_the_pod(topo, family), "a re-apply without drop-invalid removes ISTIO_DROP"
