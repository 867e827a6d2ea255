"""End to end: the controller as a subprocess, the API emulator, pods as real processes in real netns.

Every assertion is about traffic or API state; see controller_nodesim for the simulated node.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from controller_nodesim import (
    CONTROLLER_USER,
    Node,
    SimPod,
    events_for,
    host_rules,
    simulated_node,
    wait_for,
)

from istio_pod_network_controller import annotations as ann
from istio_pod_network_controller.dataplane import apply as dataplane
from istio_pod_network_controller.dataplane.netns import PinnedNetns
from istio_pod_network_controller.localapi import NAMESPACES, PODS
from istio_pod_network_controller.spec import build_spec

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]
BAD_PORTS = "80,99999"


def reasons(node: Node, pod: SimPod, namespace: str = "default") -> list[str]:
    return [e["reason"] for e in events_for(node.api, pod.name, namespace)]


def rules_in_place(node: Node, pod: SimPod, namespace: str = "default") -> bool:
    assert pod.netns
    spec = build_spec(node.annotations(pod, namespace))
    pinned = PinnedNetns.open_path(f"/run/netns/{pod.netns}")
    try:
        return dataplane.verify(pinned, spec).in_place
    finally:
        pinned.close()


def no_capture_rules(pod: SimPod) -> bool:
    return "ISTIO" not in pod.exec(["iptables-save"]) + pod.exec(["iptables-legacy-save"]) + pod.exec(
        ["nft", "list", "ruleset"]
    )


def annotate(node: Node, pod: SimPod, notes: dict[str, str], namespace: str = "default") -> None:
    def change(obj: dict) -> dict:  # type: ignore[type-arg]
        meta = {**obj["metadata"], "annotations": {**obj["metadata"].get("annotations", {}), **notes}}
        return {**obj, "metadata": meta}

    node.api.store.mutate(PODS, namespace, pod.name, change)


def test_node_selection_traffic_events_api_budget_repair_and_restart() -> None:
    with simulated_node("ipnce") as node:
        node.api.store.seed(NAMESPACES, [{"metadata": {"name": "legacy", "annotations": {
            ann.LEGACY_INITIALIZE: "true"}}}])  # fmt: skip
        mesh = node.make_netns("mesh")
        node.create(mesh)
        legacy = node.make_netns("legacy-pod")
        node.create(legacy, mesh=False, annotations={ann.LEGACY_INITIALIZE: "true"})
        in_ns = node.make_netns("in-legacy-ns")
        node.create(in_ns, "legacy", mesh=False)
        plain = node.make_netns("plain")
        node.create(plain, mesh=False)
        bad = node.make_netns("bad")
        node.create(bad, annotations={ann.INCLUDE_INBOUND_PORTS: BAD_PORTS})
        opted_out = node.make_netns("opted-out")
        node.create(opted_out, labels={ann.SIDECAR_INJECT: "false"})
        host = node.host_pod("host")
        node.create(host, host_network=True)
        for pod in (mesh, plain):
            node.listen(pod, 8080, "app")
            node.listen(pod, 15006, "envoy-in")
        before = host_rules()

        ctl = node.start_controller("--repair-interval", "1")
        ctl.wait_ready()
        selected = [(mesh, "default"), (legacy, "default"), (in_ns, "legacy")]
        wait_for(lambda: all(node.initialized(p, n) for p, n in selected), 15, "selected pods marked")
        wait_for(lambda: "HostNetworkSkipped" in reasons(node, host), 5, "hostNetwork warning")
        wait_for(lambda: "InvalidInterceptionConfig" in reasons(node, bad), 5, "invalid config warning")

        # Traffic: the mesh pod's app port lands on the inbound capture listener; the plain pod's does not.
        assert node.connect(mesh, 8080) == "envoy-in 8080"
        assert node.connect(plain, 8080).startswith("app")
        for pod, namespace in selected:
            assert rules_in_place(node, pod, namespace)
            assert node.annotations(pod, namespace)[ann.SPEC_DIGEST]
            assert reasons(node, pod, namespace) == ["Initialized"]
        for pod in (plain, bad, opted_out):
            assert not node.initialized(pod) and no_capture_rules(pod)
        assert not node.initialized(host)
        (invalid,) = events_for(node.api, "bad")
        assert invalid["type"] == "Warning"
        assert ann.INCLUDE_INBOUND_PORTS in invalid["message"] and BAD_PORTS in invalid["message"]
        assert invalid["source"] == {"component": "istio-pod-network-controller", "host": node.name}
        assert invalid["involvedObject"]["uid"] == bad.uid

        # API budget: one patch and one Event per initialized pod, no GETs, nothing forbidden.
        records = [r for r in node.api.requests.records() if r.resource]
        assert {r.user for r in records} == {CONTROLLER_USER}
        assert not [r for r in records if r.status == 403]
        for pod, _ in selected:
            assert node.api.requests.count(verb="patch", resource="pods", name=pod.name) == 1
        assert node.api.requests.count(verb="get") == 0
        assert node.api.requests.count(verb="create", resource="events") == 5  # 3 Initialized + 2 Warnings
        assert ctl.metric("istio_pod_network_controller_pods_initialized_total") == 3
        assert ctl.metric("istio_pod_network_controller_pods_failed_total", 'reason="invalid_config"') >= 1
        assert ctl.metric("istio_pod_network_controller_stage_seconds_count", 'stage="apply"') >= 3

        # Reconfigured: an annotation edited after init changes the rules and the digest.
        digest = node.annotations(mesh)[ann.SPEC_DIGEST]
        annotate(node, mesh, {ann.EXCLUDE_INBOUND_PORTS: "8080"})
        wait_for(lambda: node.annotations(mesh)[ann.SPEC_DIGEST] != digest, 10, "new digest")
        wait_for(lambda: "Reconfigured" in reasons(node, mesh), 5, "Reconfigured event")
        assert node.connect(mesh, 8080).startswith("app")
        assert rules_in_place(node, mesh)

        # Drift: someone flushes the legacy pod's rules; the periodic verify puts them back.
        legacy.exec(["nft", "flush", "ruleset"])
        legacy.exec(["iptables-legacy", "-t", "nat", "-F"])
        wait_for(lambda: "Repaired" in reasons(node, legacy), 10, "Repaired event")
        wait_for(lambda: rules_in_place(node, legacy), 5, "rules back")
        assert ctl.metric("istio_pod_network_controller_pods_repaired_total") >= 1
        assert ctl.terminate() == 0

        # Restart with everything in place: no write at all (repeated Warnings are refused as duplicates).
        node.api.requests.clear()
        again = node.start_controller()
        again.wait_ready()
        time.sleep(1.0)
        assert node.api.requests.count(verb="patch") == 0
        assert node.api.requests.count(verb="create", resource="events", status=201) == 0
        assert len(events_for(node.api, "bad")) == 1 and len(events_for(node.api, "host")) == 1
        assert again.terminate() == 0
        assert host_rules() == before


def test_pod_before_its_netns_gets_a_warning_then_is_initialized_when_it_appears() -> None:
    with simulated_node("ipncl") as node:
        late = SimPod("late", None, None, None)
        node.pods.append(late)
        node.create(late)
        ctl = node.start_controller("--netns-deadline", "1")
        ctl.wait_ready()
        wait_for(lambda: "NetworkNamespaceNotFound" in reasons(node, late), 10, "deadline warning")
        assert not node.initialized(late)
        made = node.make_netns("late-netns", with_process=False)
        late.netns, late.ip4, late.peer4 = made.netns, made.ip4, made.peer4
        node.pods.remove(made)
        node.start_process(late)

        def running(obj: dict) -> dict:  # type: ignore[type-arg]
            return {**obj, "status": {"phase": "Running", "podIP": late.ip4, "podIPs": [{"ip": late.ip4}]}}

        node.api.store.mutate(PODS, "default", "late", running, subresource="status")
        wait_for(lambda: node.initialized(late), 10, "initialized after the netns appeared")
        assert rules_in_place(node, late)
        assert reasons(node, late).count("NetworkNamespaceNotFound") == 1
        assert ctl.terminate() == 0


def test_sigkill_mid_burst_then_restart_initializes_everything_once() -> None:
    with simulated_node("ipnck") as node:
        pods = [node.make_netns(f"burst-{i}") for i in range(30)]
        for pod in pods:
            node.create(pod)
        ctl = node.start_controller("--concurrency", "2")
        wait_for(lambda: sum(node.initialized(p) for p in pods) >= 3, 20, "some pods marked")
        ctl.kill()
        done_before = sum(node.initialized(p) for p in pods)
        assert done_before < len(pods), "the kill came too late to test anything"
        again = node.start_controller()
        again.wait_ready()
        wait_for(lambda: all(node.initialized(p) for p in pods), 20, "all pods marked")
        for pod in pods:
            assert rules_in_place(node, pod), pod.name  # exact rules: no duplicates, nothing missing
            assert node.api.requests.count(verb="patch", name=pod.name) == 1
            # The Event of a pod marked just before the kill may be lost with the process: best effort.
            assert reasons(node, pod) in (["Initialized"], [])
        assert sum(reasons(node, p) == ["Initialized"] for p in pods) >= len(pods) - 2
        assert again.terminate() == 0


def test_api_faults_drop_410_429_500_pause_lose_nothing() -> None:
    with simulated_node("ipncf", bookmark_interval=0.5) as node:
        ctl = node.start_controller("--watch-inactivity", "2")
        ctl.wait_ready()
        faults = node.api.faults
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
            pod = node.make_netns(f"fault-{label}")
            node.create(pod)
            pods.append(pod)
            if label == "pause":
                time.sleep(3)  # longer than the watchdog: the stream is restarted into a hanging request
                faults.resume()
            wait_for(lambda pod=pod: node.initialized(pod), 20, f"pod after {label}\n{ctl.log()}")
        for pod in pods:
            assert rules_in_place(node, pod)
            assert node.api.requests.count(verb="patch", name=pod.name, status=200) == 1
        assert ctl.metric("istio_pod_network_controller_watch_restarts_total", 'reason="expired"') >= 1
        assert ctl.metric("istio_pod_network_controller_api_errors_total", 'code="429"') >= 1
        assert ctl.metric("istio_pod_network_controller_api_errors_total", 'code="500"') >= 1
        assert ctl.metric("istio_pod_network_controller_relists_total", 'resource="pods"') >= 2
        assert node.api.requests.count(verb="get") == 0
        assert ctl.terminate() == 0


def test_readyz_waits_for_initial_sync_and_sigterm_exits_zero() -> None:
    with simulated_node("ipncr") as node:
        pod = node.make_netns("early")
        node.create(pod)
        node.api.faults.pause()
        ctl = node.start_controller()
        wait_for(lambda: ctl.http("/healthz")[0] == 200, 15, "healthz")
        assert ctl.http("/readyz")[0] == 503
        node.api.faults.resume()
        ctl.wait_ready()
        assert node.initialized(pod)  # readiness came after the pods already on the node
        assert "istio_pod_network_controller_queue_depth" in ctl.http("/metrics")[1]
        started = time.monotonic()
        assert ctl.terminate() == 0
        assert time.monotonic() - started < 5


def test_refuses_to_start_without_node_name() -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run([sys.executable, "-m", "istio_pod_network_controller", "run", "--kubeconfig", "/x"],
                          capture_output=True, text=True, env=env, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 2 and "--node-name" in done.stderr
