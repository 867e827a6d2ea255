"""Attacks by an app with NET_ADMIN in its own pod (issue 21), reproduced the way it would do them, against
the real data plane (apply / verify on real namespaces) and proven with packets; every backend.

- kernel names are input: tables, chains and interfaces named with bytes that are not UTF-8 break no apply or
  verify, and a capture jump deleted afterwards is found and repaired.
"""

from __future__ import annotations

import pytest
from tenant_attacker import WEIRD, add_nft_table_and_chain, run
from test_capture import ENVOY_OUT, lands, spec
from traffic_harness import APP_UID, Capture, Topology

from istio_pod_network_controller.rules import nftables

pytestmark = pytest.mark.root


def _delete_capture_jump(capture: Capture) -> None:
    ns = capture.topo.pod
    if capture.backend == "nftables":
        run(ns, "nft", "flush", "chain", "inet", nftables.TABLE, "nat_output")
    else:
        tool = "iptables-legacy" if capture.backend == "legacy" else "iptables-nft"
        run(ns, tool, "-t", "nat", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT")


def test_non_utf8_kernel_names_then_a_deleted_jump(topo: Topology, capture: Capture) -> None:
    wanted = spec()
    capture.apply(wanted)
    add_nft_table_and_chain(topo.pod, b"t" + WEIRD, b"c" + WEIRD)
    run(topo.pod, "ip", "link", "add", b"e" + WEIRD, "type", "veth", "peer", "name", b"p" + WEIRD)
    run(topo.pod, "ip", "link", "set", b"e" + WEIRD, "up")
    if capture.backend != "nftables":  # foreign rules naming those interfaces, one a jump into our chain
        tool = "iptables-legacy" if capture.backend == "legacy" else "iptables-nft"
        run(topo.pod, tool, "-t", "nat", "-A", "OUTPUT", "-o", b"e" + WEIRD, "-j", "RETURN")
        run(topo.pod, tool, "-t", "nat", "-A", "OUTPUT", "-o", b"p" + WEIRD, "-j", "ISTIO_OUTPUT")
    assert capture.verify(wanted).report is not None  # read without raising
    capture.apply(wanted)
    assert capture.verify(wanted).in_place, capture.verify(wanted).report
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), ENVOY_OUT)

    _delete_capture_jump(capture)
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), "peer:9090")  # the attack works ...
    drift = capture.verify(wanted)
    assert not drift.in_place  # ... is seen ...
    capture.apply(wanted)  # ... and repaired
    assert capture.verify(wanted).in_place
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), ENVOY_OUT)
