"""End to end: the controller as a subprocess, the API emulator, pods as real processes in real netns.

Every assertion is about traffic or API state; the simulated cluster is `ipnc_lab.sim`
(SimCluster: emulator + SimNode + ControllerProcess), the controller runs as a user with exactly the
chart's ClusterRole.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ipnc_lab.sim.cluster import (
    CONTROLLER_USER,
    SimCluster,
    host_rules,
)
from ipnc_lab.sim.controller import ControllerProcess, wait_for
from ipnc_lab.sim.netns import holds_capture_rules
from ipnc_lab.sim.node import SimNode, SimPod
from ipnc_lab.sim.traffic import Server, connect
from istio_pod_network_controller.settings import annotations as ann

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]
BAD_PORTS = "80,99999"
FAST_RELIST = ("--relist-jitter", "0.2")


def start(cluster: SimCluster, node: SimNode, *extra: str) -> ControllerProcess:
    return cluster.start_controller(node, [*FAST_RELIST, *extra])


def rules_in_place(cluster: SimCluster, pod: SimPod) -> bool:
    return cluster.verify(pod).in_place


def no_capture_rules(pod: SimPod) -> bool:
    assert pod.netns
    return not holds_capture_rules(pod.netns)


def dial(node: SimNode, pod: SimPod, port: int) -> str:
    """From the node side to the pod's address: `<listener label> <original dst port>`, or the error."""
    assert pod.ip
    reply = connect(node.node, pod.ip, port)
    if not reply.ok:
        return f"error {reply.error}"
    return f"{reply.label} {reply.orig[1] if reply.orig else 0}"


def test_node_selection_traffic_events_api_budget_repair_and_restart() -> None:
    with SimCluster() as cluster, Server() as server:
        node = cluster.add_node("ipnce")
        cluster.add_namespace("legacy", {ann.LEGACY_INITIALIZE: "true"})
        mesh = cluster.add_pod(node, "mesh")
        legacy = cluster.add_pod(node, "legacy-pod", mesh=False, annotations={ann.LEGACY_INITIALIZE: "true"})
        in_ns = cluster.add_pod(node, "in-legacy-ns", "legacy", mesh=False)
        plain = cluster.add_pod(node, "plain", mesh=False)
        bad = cluster.add_pod(node, "bad", annotations={ann.INCLUDE_INBOUND_PORTS: BAD_PORTS})
        opted_out = cluster.add_pod(node, "opted-out", labels={ann.SIDECAR_INJECT: "false"})
        host = cluster.add_pod(node, "host", host_network=True)
        for pod in (mesh, plain):
            server.add(pod.netns, "app", 8080, bind6=None)
            server.add(pod.netns, "envoy-in", 15006, bind6=None)
        server.start()
        before = host_rules()

        ctl = start(cluster, node, "--repair-interval", "1")
        ctl.wait_ready()
        selected = [mesh, legacy, in_ns]
        wait_for(lambda: all(cluster.initialized(p) for p in selected), 15, "selected pods marked")
        wait_for(lambda: "HostNetworkSkipped" in cluster.reasons(host), 5, "hostNetwork warning")
        wait_for(lambda: "InvalidInterceptionConfig" in cluster.reasons(bad), 5, "invalid config warning")

        # Traffic: the mesh pod's app port lands on the inbound capture listener; the plain pod's does not.
        assert dial(node, mesh, 8080) == "envoy-in 8080"
        assert dial(node, plain, 8080).startswith("app")
        for pod in selected:
            assert rules_in_place(cluster, pod)
            assert cluster.annotations(pod)[ann.SPEC_DIGEST]
            assert cluster.reasons(pod) == ["Initialized"]
        for pod in (plain, bad, opted_out):
            assert not cluster.initialized(pod) and no_capture_rules(pod)
        assert not cluster.initialized(host)
        (invalid,) = cluster.events(bad)
        assert invalid["type"] == "Warning"
        assert ann.INCLUDE_INBOUND_PORTS in invalid["message"] and BAD_PORTS in invalid["message"]
        assert invalid["source"] == {"component": "istio-pod-network-controller", "host": node.name}
        assert invalid["involvedObject"]["uid"] == bad.uid

        # API budget: one patch and one Event per initialized pod, no GETs, nothing forbidden.
        api = cluster.api
        records = [r for r in api.requests.records() if r.resource]
        assert {r.user for r in records} == {CONTROLLER_USER}
        assert not [r for r in records if r.status == 403]
        for pod in selected:
            assert api.requests.count(verb="patch", resource="pods", name=pod.name) == 1
        assert api.requests.count(verb="get") == 0
        assert api.requests.count(verb="create", resource="events") == 5  # 3 Initialized + 2 Warnings
        assert ctl.metric("istio_pod_network_controller_pods_initialized_total") == 3
        assert ctl.metric("istio_pod_network_controller_pods_failed_total", 'reason="invalid_config"') >= 1
        assert ctl.metric("istio_pod_network_controller_stage_seconds_count", 'stage="apply"') >= 3

        # Reconfigured: an annotation edited after init changes the rules and the digest.
        digest = cluster.annotations(mesh)[ann.SPEC_DIGEST]
        cluster.edit_annotations(mesh, {ann.EXCLUDE_INBOUND_PORTS: "8080"})
        wait_for(lambda: cluster.annotations(mesh)[ann.SPEC_DIGEST] != digest, 10, "new digest")
        wait_for(lambda: "Reconfigured" in cluster.reasons(mesh), 5, "Reconfigured event")
        assert dial(node, mesh, 8080).startswith("app")
        assert rules_in_place(cluster, mesh)

        # Drift: someone flushes the legacy pod's rules; the periodic verify puts them back.
        assert legacy.netns
        legacy.netns.exec(["nft", "flush", "ruleset"])
        legacy.netns.exec(["iptables-legacy", "-t", "nat", "-F"])
        wait_for(lambda: "Repaired" in cluster.reasons(legacy), 10, "Repaired event")
        wait_for(lambda: rules_in_place(cluster, legacy), 5, "rules back")
        assert ctl.metric("istio_pod_network_controller_pods_repaired_total") >= 1
        assert ctl.terminate() == 0

        # Restart with everything in place: no write at all (repeated Warnings are refused as duplicates).
        api.requests.clear()
        again = start(cluster, node)
        again.wait_ready()
        time.sleep(1.0)
        assert api.requests.count(verb="patch") == 0
        assert api.requests.count(verb="create", resource="events", status=201) == 0
        assert len(cluster.events(bad)) == 1 and len(cluster.events(host)) == 1
        assert again.terminate() == 0
        assert host_rules() == before


def test_pod_before_its_netns_gets_a_warning_then_is_initialized_when_it_appears() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncl")
        cluster.create_pod(node, None, "late")
        ctl = start(cluster, node, "--netns-deadline", "1")
        ctl.wait_ready()
        late = SimPod("late", "default", "", None, None, node.cgroup_root, "")  # not on the node yet
        wait_for(lambda: "NetworkNamespaceNotFound" in cluster.reasons(late), 10, "deadline warning")
        assert not cluster.initialized(late)
        late = node.add_pod("late", "default", cluster.pod_object(late)["metadata"]["uid"])
        cluster.report(late, containers=False)
        wait_for(lambda: cluster.initialized(late), 10, "initialized after the netns appeared")
        assert rules_in_place(cluster, late)
        assert cluster.reasons(late).count("NetworkNamespaceNotFound") == 1
        assert ctl.terminate() == 0


def test_sigkill_mid_burst_then_restart_initializes_everything_once() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipnck")
        pods = [cluster.add_pod(node, f"burst-{i}") for i in range(30)]
        ctl = start(cluster, node, "--concurrency", "2")
        wait_for(lambda: sum(cluster.initialized(p) for p in pods) >= 3, 20, "some pods marked")
        ctl.kill()
        done_before = sum(cluster.initialized(p) for p in pods)
        assert done_before < len(pods), "the kill came too late to test anything"
        restarted = time.time()
        again = start(cluster, node)
        again.wait_ready()
        wait_for(lambda: all(cluster.initialized(p) for p in pods), 20, "all pods marked")
        for pod in pods:
            assert rules_in_place(cluster, pod), pod.name  # exact rules: no duplicates, nothing missing
            # Marked once. A patch the killed process had sent may be on record unfinished (status None:
            # the server dropped it with the connection, the pod unchanged), and then the restarted
            # controller marks the pod: count what the server completed, and allow only such orphans.
            patches = [r for r in cluster.api.requests.records() if r.verb == "patch" and r.name == pod.name]
            assert [r.status for r in patches if r.status is not None] == [200], pod.name
            assert all(r.status is not None or r.time < restarted for r in patches), pod.name
            # The Event of a pod marked just before the kill may be lost with the process: best effort.
            assert cluster.reasons(pod) in (["Initialized"], [])
        assert sum(cluster.reasons(p) == ["Initialized"] for p in pods) >= len(pods) - 2
        assert again.terminate() == 0


def test_api_faults_drop_410_429_500_pause_lose_nothing() -> None:
    with SimCluster(bookmark_interval=0.5) as cluster:
        node = cluster.add_node("ipncf")
        ctl = start(cluster, node, "--watch-inactivity", "2")
        ctl.wait_ready()
        faults = cluster.api.faults
        scenarios = {
            "drop": faults.drop_watches,
            "restart410": faults.restart,
            "throttle429": lambda: faults.fail_next(3, status=429, retry_after=1),
            "error500": lambda: faults.fail_next(4, status=500),
            "pause": faults.pause,
        }
        pods = []
        for label, fault in scenarios.items():
            fault()
            sim = node.add_pod(f"fault-{label}", "default")
            cluster.create_pod(node, sim, sim.name)
            pods.append(sim)
            if label == "pause":
                time.sleep(3)  # longer than the watchdog: the stream is restarted into a hanging request
                faults.resume()
            wait_for(lambda pod=sim: cluster.initialized(pod), 20, f"pod after {label}\n{ctl.log()}")
        for pod in pods:
            assert rules_in_place(cluster, pod)
            assert cluster.api.requests.count(verb="patch", name=pod.name, status=200) == 1
        assert ctl.metric("istio_pod_network_controller_watch_restarts_total", 'reason="expired"') >= 1
        assert ctl.metric("istio_pod_network_controller_api_errors_total", 'code="429"') >= 1
        assert ctl.metric("istio_pod_network_controller_api_errors_total", 'code="500"') >= 1
        assert ctl.metric("istio_pod_network_controller_relists_total", 'resource="pods"') >= 2
        assert cluster.api.requests.count(verb="get") == 0
        assert ctl.terminate() == 0


def test_readyz_waits_for_initial_sync_and_sigterm_exits_zero() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncr")
        pod = cluster.add_pod(node, "early")
        cluster.api.faults.pause()
        ctl = start(cluster, node)
        wait_for(lambda: ctl.http("/healthz")[0] == 200, 15, "healthz")
        assert ctl.http("/readyz")[0] == 503
        cluster.api.faults.resume()
        ctl.wait_ready()
        assert cluster.initialized(pod)  # readiness came after the pods already on the node
        assert "istio_pod_network_controller_queue_depth" in ctl.http("/metrics")[1]
        started = time.monotonic()
        assert ctl.terminate() == 0
        assert time.monotonic() - started < 5


def test_refuses_to_start_without_node_name() -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run([sys.executable, "-m", "istio_pod_network_controller", "run", "--kubeconfig", "/x"],
                          capture_output=True, text=True, env=env, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 2 and "--node-name" in done.stderr
