"""Issue 19 on simulated pods that do what the runtime does: the node's namespace is never written, every
sandbox change is captured on the kubelet's status update, and our rules in the node's namespace alarm.

The node's namespace here is the simulation's scratch namespace (SimNode.node), never the machine's: it
holds the node's IP, which the pods' status reports as hostIP, and the machine's PID 1 is not in it (as
if /proc/1/ns/net were unreadable). Every pod is created as the runtime creates it: the API object first,
then a process of the pod's cgroup in the node's namespace while the sandbox is made, then the sandbox,
then the pod IP in the status.
"""

from __future__ import annotations

import pytest

from ipnc_lab.localapi import CORE_EVENTS
from ipnc_lab.sim.cluster import SimCluster, unique_name
from ipnc_lab.sim.controller import ControllerProcess, wait_for
from ipnc_lab.sim.netns import holds_capture_rules
from ipnc_lab.sim.node import SimNode, SimPod
from istio_pod_network_controller.controller import events as ev
from istio_pod_network_controller.dataplane import apply as dataplane
from istio_pod_network_controller.settings.spec import build_spec

pytestmark = pytest.mark.root
SLOW_REPAIR = ("--repair-interval", "600")
"""No periodic pass within a test: what gets captured is captured on a watch event."""
METRIC_ALARMS = "istio_pod_network_controller_node_netns_rules_found_total"


def start(cluster: SimCluster, node: SimNode, *extra: str) -> ControllerProcess:
    ctl = cluster.start_controller(node, ["--log-level", "debug", *extra])
    ctl.wait_ready()
    return ctl


def looked_at(cluster: SimCluster, ctl: ControllerProcess, pod: SimPod) -> bool:
    """The controller acted on the pod as it is now: marked it, or said why not yet (no pod IP)."""
    return cluster.initialized(pod) or f"pod {pod.uid}: no pod IP given yet" in ctl.log(tail=10**7)


def in_place(cluster: SimCluster, pod: SimPod) -> bool:
    return cluster.verify(pod).in_place


def test_a_burst_of_pods_in_creation_never_writes_the_nodes_namespace() -> None:
    """Each pod is held while only the runtime's process (in the node's namespace) is the pod's, until the
    controller has acted on it; the old "earliest process" guess captured the node's namespace there."""
    with SimCluster() as cluster:
        node = cluster.add_node("ipncsb")
        ctl = start(cluster, node, *SLOW_REPAIR)
        pods = [cluster.start_pod(node, unique_name("burst")) for _ in range(8)]
        wait_for(lambda: all(looked_at(cluster, ctl, p) for p in pods), 30, "controller acted on every pod")
        assert not holds_capture_rules(node.node), "capture rules in the node's namespace"
        for pod in pods:
            assert not cluster.initialized(pod), f"{pod.name} marked before it had a sandbox"
            cluster.finish_sandbox(node, pod)
        cluster.wait_initialized(pods, 20, ctl.log)
        for pod in pods:
            assert in_place(cluster, pod)
            assert cluster.reasons(pod) == [ev.INITIALIZED]
        assert not holds_capture_rules(node.node)
        assert ctl.metric(METRIC_ALARMS) == 0
        assert ctl.terminate() == 0


def test_the_first_sandbox_recreation_is_captured_on_the_status_update() -> None:
    """The sandbox exists, its IP not posted yet, when the controller first sees the pod (the old code
    captured it then and recorded no IP); after the capture the pause process dies and the kubelet posts
    a new IP while the status still lists the old containers. No repair pass runs: the watch
    event with the new IP alone must bring capture to the new sandbox."""
    with SimCluster() as cluster:
        node = cluster.add_node("ipncsr")
        pod = cluster.start_pod(node, "recreated")
        cluster.finish_sandbox(node, pod, report=False)
        ctl = start(cluster, node, *SLOW_REPAIR)
        wait_for(lambda: looked_at(cluster, ctl, pod), 15, "controller acted on the pod without its IP")
        cluster.report(pod)
        cluster.wait_initialized([pod], 15, ctl.log)
        assert in_place(cluster, pod)
        for sandbox in (2, 3):
            first_ip = pod.ip
            cluster.recreate_sandbox(node, pod, order="ip-only")
            assert pod.ip != first_ip and pod.sandboxes == sandbox
            wait_for(lambda: in_place(cluster, pod), 10, f"capture in sandbox {sandbox}\n{ctl.log()}")
        wait_for(lambda: cluster.reasons(pod).count(ev.REINITIALIZED) == 2, 5, "two Reinitialized Events")
        assert not holds_capture_rules(node.node)
        assert ctl.terminate() == 0


def foreign_rule(node: SimNode) -> str:
    """The node's own rules (iptables' default variant): what the alarm must leave alone."""
    return node.node.exec(["iptables", "-S", "INPUT"])


def node_warnings(cluster: SimCluster, node: SimNode) -> int:
    return sum(
        1
        for e in cluster.store.objects(CORE_EVENTS, "default")
        if e["reason"] == ev.CAPTURE_ON_NODE
        and e["type"] == "Warning"
        and e["involvedObject"] == {**e["involvedObject"], "kind": "Node", "name": node.name}
    )


def test_our_rules_in_the_nodes_namespace_are_an_alarm_and_only_they_are_removed() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncal")
        node.node.exec(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT"])
        cluster.add_pod(node, "mesh")  # its status names the node's IP
        dataplane.apply(node.node.pinned, build_spec({}))  # what an older controller left behind
        assert holds_capture_rules(node.node)

        ctl = cluster.start_controller(node, ["--repair-interval", "1"])
        wait_for(lambda: ctl.metric(METRIC_ALARMS) >= 1, 20, f"alarm at start\n{ctl.log()}")
        assert not holds_capture_rules(node.node)
        assert "--dport 2222 -j ACCEPT" in foreign_rule(node)
        wait_for(lambda: node_warnings(cluster, node) == 1, 5, "a Warning on the Node")
        status, body = ctl.http("/readyz")
        assert status == 503 and "node's own network namespace" in body
        wait_for(lambda: ctl.http("/readyz")[0] == 200, 10, "ready again once a pass finds the node clean")

        dataplane.apply(node.node.pinned, build_spec({}))  # and again: found by the next repair pass
        wait_for(lambda: ctl.metric(METRIC_ALARMS) >= 2, 10, f"alarm in a repair pass\n{ctl.log()}")
        wait_for(lambda: not holds_capture_rules(node.node), 5, "removed again")
        assert "--dport 2222 -j ACCEPT" in foreign_rule(node)
        wait_for(lambda: node_warnings(cluster, node) == 2, 5, "a second Warning on the Node")
        assert ctl.terminate() == 0
