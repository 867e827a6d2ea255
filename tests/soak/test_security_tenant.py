"""What a pod's owner can do to its own capture through the API, end to end (root): the real controller as
the chart's RBAC user, real namespaces, real packets.

- the proxy identity annotations set to the app's own uid switch capture off for the app; with
  `--ignore-pod-overrides` they are ignored, the app is captured and a Warning says so;
- a pod created already carrying the initialized mark and an invalid annotation gets an Event that says what
  is true: this controller installed nothing in it;
- an app with NET_ADMIN names tables and links with bytes that are not UTF-8 and deletes the capture jump:
  repaired on the next pass, no traceback; then it puts a nat chain before ours: a Warning and a metric,
  and no re-apply loop (re-applying cannot outrun a chain that runs first).
"""

from __future__ import annotations

import pytest

from ipnc_lab.sim.cluster import SimCluster
from ipnc_lab.sim.controller import wait_for
from ipnc_lab.sim.netns import holds_capture_rules
from ipnc_lab.sim.node import SimNode, SimPod
from ipnc_lab.sim.traffic import Server, connect
from istio_pod_network_controller.rules import nftables
from istio_pod_network_controller.settings import annotations as ann
from tenant_attacker import WEIRD, add_nft_table_and_chain, run

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
APP_UID = 1000
APP_AS_PROXY = {ann.ENVOY_USERID: str(APP_UID), ann.ENVOY_GROUPID: str(APP_UID), ann.IPV6: "block"}


def outbound(node: SimNode, pod: SimPod) -> str | None:
    """Which listener got the app's outbound connection to the node's :9090."""
    assert pod.netns
    return connect(pod.netns, node.gateway, 9090, uid=APP_UID, gid=APP_UID).label


@pytest.mark.parametrize("ignore", [False, True], ids=["overrides-honoured", "overrides-ignored"])
def test_proxy_identity_override_is_a_bypass_unless_ignored(ignore: bool) -> None:
    with SimCluster() as cluster, Server() as server:
        node = cluster.add_node("ipnso")
        pod = cluster.add_pod(node, "app", annotations=APP_AS_PROXY)
        server.add(pod.netns, "envoy-out", 15001, bind6=None)
        server.add(node.node, "remote", 9090, bind6=None)
        server.start()
        ctl = cluster.start_controller(node, ["--ignore-pod-overrides"] if ignore else [])
        ctl.wait_ready()
        cluster.wait_initialized([pod], 15, ctl.log)
        if not ignore:  # the attack: the app, posing as the proxy, goes straight out
            assert outbound(node, pod) == "remote"
            assert "PodOverrideIgnored" not in cluster.reasons(pod)
        else:
            assert outbound(node, pod) == "envoy-out"
            wait_for(lambda: "PodOverrideIgnored" in cluster.reasons(pod), 5, "override warning")
            (warning,) = [e for e in cluster.events(pod) if e["reason"] == "PodOverrideIgnored"]
            assert warning["type"] == "Warning"
            assert all(key in warning["message"] for key in APP_AS_PROXY)
            assert str(APP_UID) not in warning["message"]  # names our keys, never the pod's values
        assert ctl.terminate() == 0


def test_forged_mark_with_invalid_annotation_is_not_called_kept() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipnsf")
        forged = {ann.STATUS: ann.STATUS_INITIALIZED, ann.EXCLUDE_INBOUND_PORTS: "80,http"}
        pod = cluster.add_pod(node, "forged", annotations=forged)
        honest = cluster.add_pod(node, "honest")  # proves the controller was working
        ctl = cluster.start_controller(node)
        ctl.wait_ready()
        cluster.wait_initialized([honest], 15, ctl.log)
        reason = "InvalidInterceptionConfig"
        wait_for(lambda: reason in cluster.reasons(pod), 10, f"{reason} warning\n{ctl.log()}")
        (warning,) = [e for e in cluster.events(pod) if e["reason"] == reason]
        assert "kept" not in warning["message"], warning["message"]
        assert "installed no capture rules" in warning["message"]
        assert pod.netns and not holds_capture_rules(pod.netns)
        assert ctl.terminate() == 0


def test_net_admin_app_against_the_controller() -> None:
    with SimCluster() as cluster, Server() as server:
        node = cluster.add_node("ipnsk")
        pod = cluster.add_pod(node, "app")
        assert pod.netns
        server.add(pod.netns, "envoy-out", 15001, bind6=None)
        server.add(node.node, "remote", 9090, bind6=None)
        server.start()
        ctl = cluster.start_controller(node, ["--repair-interval", "1"])
        ctl.wait_ready()
        cluster.wait_initialized([pod], 15, ctl.log)
        assert outbound(node, pod) == "envoy-out"
        backend = cluster.verify(pod).backend

        add_nft_table_and_chain(pod.netns, b"t" + WEIRD, b"c" + WEIRD)
        run(pod.netns, "ip", "link", "add", b"e" + WEIRD, "type", "veth", "peer", "name", b"p" + WEIRD)
        if backend == "nftables":
            run(pod.netns, "nft", "flush", "chain", "inet", nftables.TABLE, "nat_output")
        else:
            run(pod.netns, f"iptables-{backend}", "-t", "nat", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT")
        wait_for(lambda: "Repaired" in cluster.reasons(pod), 10, f"repair\n{ctl.log()}")
        assert outbound(node, pod) == "envoy-out"

        script = (
            "table ip tenant {\n  chain out {\n    type nat hook output priority -150; policy accept;\n"
            f"    meta skuid {APP_UID} tcp dport 9090 dnat to {node.gateway}:9090\n  }}\n}}\n"
        )
        pod.netns.exec(["nft", "-f", "-"], stdin=script)
        assert outbound(node, pod) == "remote"
        wait_for(lambda: "CaptureBypassed" in cluster.reasons(pod), 10, f"bypass warning\n{ctl.log()}")
        (warning,) = [e for e in cluster.events(pod) if e["reason"] == "CaptureBypassed"]
        assert warning["type"] == "Warning"
        assert "nat chain at output priority -150" in warning["message"]
        assert "tenant" not in warning["message"]  # the tenant's own names stay in the log
        metric = "istio_pod_network_controller_capture_bypasses_total"
        seen = ctl.metric(metric)
        wait_for(lambda: ctl.metric(metric) >= seen + 2, 10, "two more verifications")
        assert cluster.reasons(pod).count("Repaired") == 1  # found each pass, never a re-apply loop
        log = ctl.log(10**6)
        assert "Traceback" not in log and "UnicodeDecodeError" not in log
        assert ctl.terminate() == 0
