"""Attacks by an app with NET_ADMIN in its own pod (issue 21), reproduced the way it would do them, against
the real data plane (apply / verify on real namespaces) and proven with packets; every backend.

- kernel names are input: tables, chains and interfaces named with bytes that are not UTF-8 break no apply or
  verify, and a capture jump deleted afterwards is found and repaired;
- rules outside our chains that run before ours (a raw-table notrack, a nat chain at an earlier priority)
  bypass capture while every rule of ours is intact: verify reports them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_capture import ENVOY_OUT, lands, spec
from traffic_harness import APP_UID, Capture, Topology

from istio_pod_network_controller.rules import nftables
from tenant_attacker import WEIRD, add_nft_table_and_chain, run

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


def _ipt(backend: str) -> str:
    return {"legacy": "iptables-legacy", "nft": "iptables-nft"}.get(backend, "")


def _notrack_app(capture: Capture) -> None:
    """Raw-table rules that turn connection tracking off for the app's connections to :9090 (its packets
    and the replies): no NAT rule, ours included, ever sees them."""
    ns = capture.topo.pod
    if capture.backend == "nftables":
        script = (
            "table inet tenant {\n"
            "  chain out {\n    type filter hook output priority -300; policy accept;\n"
            f"    meta skuid {APP_UID} notrack\n  }}\n"
            "  chain in {\n    type filter hook prerouting priority -300; policy accept;\n"
            "    tcp sport 9090 notrack\n  }\n"
            "}\n"
        )
        ns.exec(["nft", "-f", "-"], stdin=script)
        return
    tool = _ipt(capture.backend)
    owner = ["-m", "owner", "--uid-owner", str(APP_UID)]
    run(ns, tool, "-t", "raw", "-A", "OUTPUT", *owner, "-j", "CT", "--notrack")
    run(ns, tool, "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--sport", "9090", "-j", "CT", "--notrack")


def _dnat_first(capture: Capture) -> None:
    """A nat chain at priority -150 that DNATs the app's connections to their own destination: a
    connection is NAT'ed once, by the first nat chain with a binding, so ours never runs."""
    topo = capture.topo
    script = (
        "table ip tenant {\n  chain out {\n    type nat hook output priority -150; policy accept;\n"
        f"    meta skuid {APP_UID} tcp dport 9090 dnat to {topo.peer4}:9090\n  }}\n}}\n"
    )
    topo.pod.exec(["nft", "-f", "-"], stdin=script)


@pytest.mark.parametrize("attack", [_notrack_app, _dnat_first], ids=["raw-notrack", "nat-priority-150"])
def test_foreign_rules_before_ours_are_reported(
    topo: Topology, capture: Capture, attack: Callable[[Capture], None]
) -> None:
    wanted = spec()
    capture.apply(wanted)
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), ENVOY_OUT)
    attack(capture)
    lands(topo.connect(topo.pod, topo.peer4, 9090, uid=APP_UID), "peer:9090")  # the bypass works ...
    drift = capture.verify(wanted)
    assert not drift.lines, drift.report  # ... while every rule of ours is as rendered ...
    assert drift.bypasses and not drift.in_place, drift.report  # ... and verify no longer says "in place"
    assert "bypass" in drift.report
