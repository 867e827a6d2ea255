"""Several nodes, one controller each, one emulator: each controller touches only its own node's pods, and
its API load follows the pods on its node, not the pods in the cluster. bench/many_nodes_bench.py reports
the figures; this test asserts the behaviour.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ipnc_lab.localapi import CORE_EVENTS, RequestRecord
from ipnc_lab.sim.cluster import CONTROLLER_USER, SimCluster
from ipnc_lab.sim.controller import wait_for
from ipnc_lab.sim.node import SimNode, SimPod

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def requests_of(cluster: SimCluster, node: SimNode) -> list[RequestRecord]:
    """Requests made with the controller token bound to `node` (under the chart's node restriction)."""
    return [r for r in cluster.api.requests.records() if r.user == CONTROLLER_USER and r.node == node.name]


def writes(cluster: SimCluster, node: SimNode) -> tuple[int, int]:
    """(pod patches, Event creates) the node's controller has made so far."""
    records = requests_of(cluster, node)
    patches = sum(r.verb == "patch" and r.resource == "pods" for r in records)
    return patches, sum(r.verb == "create" and r.resource == "events" for r in records)


def wait_writes(cluster: SimCluster, node: SimNode, pods: int, log: Callable[[], str]) -> None:
    """Until the node's controller has patched and sent the Initialized Event of `pods` pods (Events are
    sent after the mark, so a pod can be marked before its Event lands)."""
    wait_for(lambda: writes(cluster, node) >= (pods, pods), 30, f"{pods} patches and Events\n{log()}")


def test_each_controller_touches_only_its_node_and_its_load_ignores_other_nodes() -> None:
    with SimCluster() as cluster:
        nodes = [cluster.add_node(f"ipnm{letter}") for letter in "abc"]
        pods: dict[str, list[SimPod]] = {n.name: [] for n in nodes}
        for node in nodes:
            pods[node.name] += [cluster.add_pod(node, f"{node.name}-m{i}") for i in range(3)]
            cluster.add_pod(node, f"{node.name}-plain", mesh=False)
        controllers = {n.name: cluster.start_controller(n) for n in nodes}
        for node in nodes:
            controllers[node.name].wait_ready()
            cluster.wait_initialized(pods[node.name], 20, controllers[node.name].log)
            wait_writes(cluster, node, 3, controllers[node.name].log)

        # Node a's load before and after node b gets three times the pods.
        a, b, _ = nodes
        before_a, before_b = len(requests_of(cluster, a)), len(requests_of(cluster, b))
        pods[b.name] += [cluster.add_pod(b, f"{b.name}-more{i}") for i in range(6)]
        cluster.wait_initialized(pods[b.name], 20, controllers[b.name].log)
        wait_writes(cluster, b, 9, controllers[b.name].log)  # node b's last requests of the round
        assert len(requests_of(cluster, a)) == before_a, [r.path for r in requests_of(cluster, a)[before_a:]]
        grown = requests_of(cluster, b)[before_b:]
        assert sum(r.verb == "patch" for r in grown) == 6
        assert sum(r.verb == "create" and r.resource == "events" for r in grown) == 6

        events = cluster.store.objects(CORE_EVENTS, "default")
        for node in nodes:
            mine = {p.name for p in pods[node.name]}
            records = requests_of(cluster, node)
            assert records and not [r for r in records if r.status == 403]
            # Writes name only this node's pods; pod reads are always filtered to this node.
            patched = {r.name for r in records if r.verb == "patch"}
            assert patched == mine
            for r in records:
                if r.resource == "pods" and r.verb in ("list", "watch"):
                    assert r.query.get("fieldSelector") == f"spec.nodeName={node.name}", r
            # Every Event this controller sent is about its own pods, and every mesh pod of the node was
            # initialized by this node's controller.
            sent = [e for e in events if e["source"]["host"] == node.name]
            assert {e["involvedObject"]["name"] for e in sent} == mine
            for pod in pods[node.name]:
                (init,) = [e for e in cluster.events(pod) if e["reason"] == "Initialized"]
                assert init["source"]["host"] == node.name and f"by {node.name} " in init["message"]
        for controller in controllers.values():
            assert controller.terminate() == 0
