"""Traffic capture proven with real connections through the rules `dataplane.apply` installs.

Every test gets a fresh pod/peer pair of namespaces (see conftest.py), applies a spec with the backend under
test, and asserts which listener received each connection (label) and, where it matters, the original
destination the listener saw (SO_ORIGINAL_DST for REDIRECT, getsockname() for TPROXY).
"""

from __future__ import annotations

import subprocess

import pytest
from traffic_harness import APP_UID, PROXY_ID, Capture, Reply, Topology

from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import InterceptSpec, build_spec

pytestmark = pytest.mark.root

ENVOY_IN = "envoy-in:15006"
ENVOY_OUT = "envoy-out:15001"


def spec(annotations: dict[str, str] | None = None, *, capture_v6: bool = True) -> InterceptSpec:
    """A spec from pod annotations, with the IPv6 policy resolved (both namespaces have IPv6)."""
    return build_spec(annotations or {}).with_ipv6(capture_v6)


def lands(reply: Reply, label: str) -> None:
    assert reply.ok, f"expected {label}, got {reply}"
    assert reply.token_ok, f"token not echoed: {reply}"
    assert reply.label == label, f"expected {label}, got {reply}"


# --- inbound -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_inbound_app_port_redirected_to_15006(topo: Topology, capture: Capture, family: int) -> None:
    capture.apply(spec())
    pod = topo.pod_ip(family)
    reply = topo.connect(topo.peer, pod, 8080)
    lands(reply, ENVOY_IN)
    assert reply.orig == (pod, 8080)


def test_inbound_excluded_ports_reach_app(topo: Topology, capture: Capture) -> None:
    capture.apply(spec({ann.EXCLUDE_INBOUND_PORTS: "8081"}))
    for port in (15008, 15020, 15021, 15090, 8081):
        reply = topo.connect(topo.peer, topo.pod4, port)
        lands(reply, f"app:{port}")
        assert reply.local == (topo.pod4, port)
    lands(topo.connect(topo.peer, topo.pod4, 8080), ENVOY_IN)


def test_inbound_explicit_port_list(topo: Topology, capture: Capture) -> None:
    capture.apply(spec({ann.INCLUDE_INBOUND_PORTS: "8080"}))
    captured = topo.connect(topo.peer, topo.pod4, 8080)
    lands(captured, ENVOY_IN)
    assert captured.orig == (topo.pod4, 8080)
    lands(topo.connect(topo.peer, topo.pod4, 8081), "app:8081")
    lands(topo.connect(topo.peer, topo.pod4, 15008), "app:15008")


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_inbound_passthrough_from_127_0_0_6_reaches_app(topo: Topology, capture: Capture, mode: str) -> None:
    capture.apply(spec({ann.INTERCEPTION_MODE: mode}))
    reply = topo.connect(topo.pod, topo.pod4, 8080, uid=PROXY_ID, gid=PROXY_ID, src="127.0.0.6")
    lands(reply, "app:8080")
    assert reply.client is not None
    assert reply.client[0] == "127.0.0.6"
    # the same call by the proxy without the passthrough source: the app-calls-itself case, captured inbound
    hairpin = topo.connect(topo.pod, topo.pod4, 8080, uid=PROXY_ID, gid=PROXY_ID)
    lands(hairpin, ENVOY_IN)
    assert hairpin.orig == (topo.pod4, 8080)


# --- outbound ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_outbound_from_app_uid_redirected_to_15001(topo: Topology, capture: Capture, family: int) -> None:
    capture.apply(spec())
    peer = topo.peer_ip(family)
    reply = topo.connect(topo.pod, peer, 9090, uid=APP_UID)
    lands(reply, ENVOY_OUT)
    assert reply.orig == (peer, 9090)


@pytest.mark.parametrize("family", [4, 6])
def test_outbound_from_proxy_goes_direct(topo: Topology, capture: Capture, family: int) -> None:
    capture.apply(spec())
    peer = topo.peer_ip(family)
    by_uid = topo.connect(topo.pod, peer, 9090, uid=PROXY_ID, gid=PROXY_ID)
    lands(by_uid, "peer:9090")
    assert by_uid.local == (peer, 9090)
    by_gid = topo.connect(topo.pod, peer, 9090, uid=APP_UID, gid=PROXY_ID)
    lands(by_gid, "peer:9090")
    lands(topo.connect(topo.pod, peer, 9090, uid=APP_UID, gid=APP_UID), ENVOY_OUT)


@pytest.mark.parametrize("loopback", ["127.0.0.1", "::1"])
def test_outbound_to_loopback_goes_direct(topo: Topology, capture: Capture, loopback: str) -> None:
    capture.apply(spec())
    reply = topo.connect(topo.pod, loopback, 8080, uid=APP_UID)
    lands(reply, "app:8080")
    assert reply.local == (loopback, 8080)
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), ENVOY_OUT)


def test_outbound_excluded_ip_range_goes_direct(topo: Topology, capture: Capture) -> None:
    capture.apply(spec({ann.EXCLUDE_OUTBOUND_IP_RANGES: f"{topo.peer4}/32"}))
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), "peer:9090")
    # only the excluded range: the peer's IPv6 address is still captured
    lands(topo.connect(topo.pod, topo.peer6, 9090, uid=APP_UID), ENVOY_OUT)


def test_outbound_excluded_port_goes_direct(topo: Topology, capture: Capture) -> None:
    capture.apply(spec({ann.EXCLUDE_OUTBOUND_PORTS: "9091"}))
    lands(topo.connect(topo.pod, topo.peer4, 9091, uid=APP_UID), "peer:9091")
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), ENVOY_OUT)


def test_outbound_include_ranges_not_covering_peer_go_direct(topo: Topology, capture: Capture) -> None:
    capture.apply(spec({ann.INCLUDE_OUTBOUND_IP_RANGES: "10.99.0.0/16"}))
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), "peer:9090")
    covering = spec({ann.INCLUDE_OUTBOUND_IP_RANGES: f"10.99.0.0/16,{topo.peer4}/32"})
    capture.apply(covering)
    reply = topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID)
    lands(reply, ENVOY_OUT)
    assert reply.orig == (topo.peer4, 9090)


def test_outbound_include_ports_only(topo: Topology, capture: Capture) -> None:
    capture.apply(spec({ann.INCLUDE_OUTBOUND_IP_RANGES: "", ann.INCLUDE_OUTBOUND_PORTS: "9090"}))
    reply = topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID)
    lands(reply, ENVOY_OUT)
    assert reply.orig == (topo.peer4, 9090)
    lands(topo.connect(topo.pod, topo.peer4, 9091, uid=APP_UID), "peer:9091")


# --- TPROXY ------------------------------------------------------------------------------------------------


TPROXY = {ann.INTERCEPTION_MODE: "TPROXY"}


@pytest.mark.parametrize("family", [4, 6])
def test_tproxy_inbound_keeps_original_destination(topo: Topology, capture: Capture, family: int) -> None:
    """Istio TPROXY: inbound TCP goes to 15006 with its destination untouched; 15008 is not exempt (Istio's
    15008 RETURN sits in the nat ISTIO_INBOUND, which TPROXY mode never enters); 15021 is (the injector's
    excludeInboundPorts)."""
    capture.apply(spec(TPROXY))
    pod = topo.pod_ip(family)
    inbound = topo.connect(topo.peer, pod, 8080)
    lands(inbound, ENVOY_IN)
    assert inbound.local == (pod, 8080), "a TPROXY socket's local address is the original destination"
    assert inbound.client is not None
    assert inbound.client[0] == topo.peer_ip(family)
    lands(topo.connect(topo.peer, pod, 15021), "app:15021")
    hbone = topo.connect(topo.peer, pod, 15008)
    lands(hbone, ENVOY_IN)
    assert hbone.local == (pod, 15008)


@pytest.mark.parametrize("family", [4, 6])
def test_tproxy_outbound_still_redirected(topo: Topology, capture: Capture, family: int) -> None:
    """Outbound stays REDIRECT in TPROXY mode, and the pod's own connections get their replies.

    Fails on legacy/nft at the time of writing: the SYN-ACK of any connection the pod opens (to 15001 over
    lo, or the proxy's direct one via eth0) falls through ISTIO_INBOUND's catch-all into xt_TPROXY, which
    finds the client's established, non-transparent socket and drops the packet (nft's `tproxy` statement
    only breaks, so nftables passes). `-m socket --transparent` does not divert these replies; Istio sends
    conntrack RELATED,ESTABLISHED to ISTIO_DIVERT before ISTIO_TPROXY.
    """
    capture.apply(spec(TPROXY))
    peer = topo.peer_ip(family)
    outbound = topo.connect(topo.pod, peer, 9090, uid=APP_UID)
    lands(outbound, ENVOY_OUT)
    assert outbound.orig == (peer, 9090)
    lands(topo.connect(topo.pod, peer, 9090, uid=PROXY_ID, gid=PROXY_ID), "peer:9090")


# --- IPv6 policy -------------------------------------------------------------------------------------------


def test_ipv6_blocked_when_not_captured(topo: Topology, capture: Capture) -> None:
    capture.apply(spec(capture_v6=False))
    refused = topo.connect(topo.peer, topo.pod6, 8080)
    assert not refused.ok
    assert refused.error == "ECONNREFUSED", f"expected a TCP reset, got {refused}"
    assert not topo.received("app:8080")
    v4 = topo.connect(topo.peer, topo.pod4, 8080)
    lands(v4, ENVOY_IN)
    assert v4.orig == (topo.pod4, 8080)


def _link_local(ns_name: str) -> str:
    """The namespace's link-local address on eth0, scoped for a client in the other namespace."""
    shown = subprocess.run(
        ["ip", "-n", ns_name, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return shown.split()[3].split("/")[0] + "%eth0"


def test_ipv6_blocked_when_not_captured_cannot_be_left_either(topo: Topology, capture: Capture) -> None:
    """The app (or anyone in the pod) reaches neither a link-local neighbour nor a global IPv6 address
    directly, over TCP (reset) or UDP (send fails with EPERM, the waiter's proof); loopback and IPv4
    capture are untouched."""
    neighbour = _link_local(topo.peer.name)
    lands(topo.connect(topo.pod, neighbour, 9090, uid=APP_UID), "peer:9090")  # the harness reaches it
    capture.apply(spec(capture_v6=False))
    for uid in (APP_UID, PROXY_ID):
        for dst in (neighbour, topo.peer6):
            for proto, port, error in (("tcp", 9090, "ECONNREFUSED"), ("udp", 53, "EPERM")):
                blocked = topo.connect(topo.pod, dst, port, proto, uid=uid, gid=uid)
                assert not blocked.ok and blocked.error == error, (uid, dst, proto, blocked)
    assert len(topo.received("peer:9090")) == 1 and not topo.received("peer-dns:53")
    lands(topo.connect(topo.pod, "::1", 8080, uid=APP_UID), "app:8080")
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), ENVOY_OUT)
    assert capture.verify(spec(capture_v6=False)).in_place


# --- DNS ---------------------------------------------------------------------------------------------------


def test_dns_not_captured_without_annotation(topo: Topology, capture: Capture) -> None:
    capture.apply(spec())
    lands(topo.connect(topo.pod, topo.peer4, 53, "udp", uid=APP_UID), "peer-dns:53")


# --- lifecycle: verify and clean, seen from the wire -------------------------------------------------------


def test_verify_reapply_and_clean(topo: Topology, capture: Capture) -> None:
    wanted = spec()
    capture.apply(wanted)
    capture.apply(wanted)  # idempotent: one copy of the rules, still capturing
    drift = capture.verify(wanted)
    assert drift.in_place, drift.report
    lands(topo.connect(topo.peer, topo.pod4, 8080), ENVOY_IN)
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), ENVOY_OUT)
    capture.clean()
    lands(topo.connect(topo.peer, topo.pod4, 8080), "app:8080")
    lands(topo.connect(topo.peer, topo.pod6, 8080), "app:8080")
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), "peer:9090")


def test_without_rules_everything_is_direct(topo: Topology) -> None:
    """The harness itself: no rules, so every listener is reached directly (no backend involved)."""
    lands(topo.connect(topo.peer, topo.pod4, 8080), "app:8080")
    lands(topo.connect(topo.peer, topo.pod6, 8080), "app:8080")
    lands(topo.connect(topo.pod, topo.peer6, 9090, uid=APP_UID), "peer:9090")
    lands(topo.connect(topo.pod, topo.peer4, 53, "udp", uid=APP_UID), "peer-dns:53")
    reply = topo.connect(topo.peer, topo.pod4, 8999)
    assert reply.error == "ECONNREFUSED"


# --- outbound-only -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_outbound_only_proxy_calling_its_pod_ip_goes_to_inbound_listener(
    topo: Topology, capture: Capture, family: int
) -> None:
    """Istio, includeInboundPorts="": `-o lo ! -d 127.0.0.1 -p tcp ! --dport 15008 -m owner --uid-owner 1337
    -j ISTIO_IN_REDIRECT` stays, so Envoy (uid 1337) calling its own pod IP reaches 15006 while inbound
    traffic from outside is not captured."""
    capture.apply(spec({ann.INCLUDE_INBOUND_PORTS: ""}))
    pod = topo.pod_ip(family)
    by_proxy = topo.connect(topo.pod, pod, 8080, uid=PROXY_ID, gid=PROXY_ID)
    lands(by_proxy, ENVOY_IN)
    assert by_proxy.orig == (pod, 8080)
    lands(topo.connect(topo.pod, pod, 15008, uid=PROXY_ID, gid=PROXY_ID), "app:15008")
    lands(topo.connect(topo.peer, pod, 8080), "app:8080")
    lands(topo.connect(topo.pod, pod, 8080, uid=APP_UID), "app:8080")
    lands(topo.connect(topo.pod, topo.peer_ip(family), 9090, uid=APP_UID), ENVOY_OUT)


def test_outbound_loopback_range_included(topo: Topology, capture: Capture) -> None:
    """Istio: a loopback range in includeOutboundIPRanges drops the `-o lo ! --uid-owner 1337 -j RETURN`
    rules, so the app's loopback traffic to that range is captured (127.0.0.1 itself is still returned)."""
    capture.apply(spec({ann.INCLUDE_OUTBOUND_IP_RANGES: "127.0.0.0/8"}))
    reply = topo.connect(topo.pod, "127.0.0.6", 8080, uid=APP_UID)
    lands(reply, ENVOY_OUT)
    assert reply.orig == ("127.0.0.6", 8080)
    lands(topo.connect(topo.pod, "127.0.0.1", 8080, uid=APP_UID), "app:8080")
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), "peer:9090")
