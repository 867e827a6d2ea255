"""The controller against a real kubelet: bursts, sandbox recreations, a node reboot, the controller away, a
native sidecar. Capture is proven by the kernel's rule state in each pod's current sandbox and by real packets
(the app starts only after the waiter saw its own probe redirected)."""

from __future__ import annotations

import threading

import pytest
from realnode_helpers import Tier

from ipnc_lab.realnode import workloads as wl
from ipnc_lab.realnode.kubeapi import wait_for
from ipnc_lab.realnode.recreate import recreate_sandboxes
from istio_pod_network_controller.settings import annotations as ann

pytestmark = [pytest.mark.realnode, pytest.mark.root]

BURSTS, BURST_SIZE = 6, 8
WAITER = ann.WAITER_CONTAINER


def create(
    tier: Tier, namespace: str, count: int, prefix: str = "p", *, native_sidecar: bool = False
) -> list[str]:
    names = [f"{prefix}{i}" for i in range(count)]
    for name in names:
        wl.create_pod(tier.api, wl.mesh_pod(name, namespace, tier.node.name, native_sidecar=native_sidecar))
    return names


def test_bursts_never_touch_the_node_namespace(tier: Tier) -> None:
    namespace = tier.namespace()
    seen: list[str] = []
    stop = threading.Event()

    def sample() -> None:  # the node's rules, read all along the bursts
        while not stop.is_set():
            seen.extend(wl.istio_lines(tier.node.host_rules()))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    names: list[str] = []
    try:
        for burst in range(BURSTS):
            batch = create(tier, namespace, BURST_SIZE, prefix=f"b{burst}x")
            wl.wait_captured(tier.api, namespace, batch, timeout=180)
            names += batch
    finally:  # the node's namespace first: a capture that stalls is often its consequence
        stop.set()
        sampler.join(10)
        assert seen == [], f"Istio's rules appeared in the node's own namespace: {seen[:5]}"
    pods = wl.wait_captured(tier.api, namespace, names, timeout=30)
    assert len(pods) == BURSTS * BURST_SIZE
    tier.delete_pods(namespace)


@pytest.mark.parametrize("rounds", [2])
def test_sandbox_recreations_are_captured_without_the_repair_pass(tier: Tier, rounds: int) -> None:
    """The first and a later recreation of each pod's sandbox: rules in the new sandbox, from the status
    update alone (the tier's controller has no periodic repair pass to fall back on)."""
    namespace = tier.namespace()
    names = create(tier, namespace, 4)
    for round_ in range(rounds):
        pods = wl.wait_captured(tier.api, namespace, names, timeout=120)
        runs = recreate_sandboxes(tier.api, namespace, list(pods.values()), timeout=60)
        missing = [r.pod for r in runs if r.rules_at is None]
        assert not missing, f"round {round_ + 1}: no rules in the new sandbox of {missing}"
        assert all(r.new_ip and r.new_ip != r.old_ip for r in runs), runs
    wl.wait_captured(tier.api, namespace, names, timeout=120)
    assert wl.istio_lines(tier.node.host_rules()) == []
    tier.delete_pods(namespace)


def test_node_reboot_recaptures_every_pod(tier: Tier) -> None:
    namespace = tier.namespace()
    names = create(tier, namespace, 4)
    before = wl.wait_captured(tier.api, namespace, names, timeout=120)
    sandboxes = {n: wl.sandbox_pid(p["metadata"]["uid"]) for n, p in before.items()}
    tier.node.reboot()
    wait_for("the kubelet serving again", tier.node.kubelet_healthy, timeout=120)

    def recaptured() -> bool:
        pods = wl.captured_now(tier.api, namespace, names)
        return pods is not None and all(
            wl.sandbox_pid(p["metadata"]["uid"]) != sandboxes[n] for n, p in pods.items()
        )

    assert wait_for("every pod re-captured in a new sandbox", recaptured, timeout=300)
    wait_for("the controller Ready again", lambda: wl.controller_ready(tier.api), timeout=120)
    assert wl.istio_lines(tier.node.host_rules()) == []
    tier.delete_pods(namespace)


def test_waiter_holds_pods_while_the_controller_is_away(tier: Tier) -> None:
    namespace = tier.namespace()
    wl.set_controller_label(tier.api, tier.node.name, on=False)
    try:
        # gone, not terminating: a controller in its grace period still captures
        wait_for("the controller gone", lambda: not tier.api.pods(wl.CONTROLLER_NAMESPACE), timeout=120)
        names = create(tier, namespace, 2)

        def waiting() -> bool:
            pods = {p["metadata"]["name"]: p for p in tier.api.pods(namespace)}
            return all(n in pods and waiter_running(pods[n]) for n in names)

        wait_for("the waiters running", waiting, timeout=120)
        held = tier.api.pods(namespace)
        assert not any(wl.app_running(p) or wl.marked(p) for p in held)
        for pod in held:
            pid = wl.sandbox_pid(pod["metadata"]["uid"])
            assert pid is not None and not wl.captured(wl.netns_rules(pid))
    finally:
        wl.set_controller_label(tier.api, tier.node.name, on=True)
    wl.wait_captured(tier.api, namespace, names, timeout=180)
    wait_for("the controller Ready again", lambda: wl.controller_ready(tier.api), timeout=120)
    tier.delete_pods(namespace)


def test_native_sidecar_starts_after_the_waiter(tier: Tier) -> None:
    namespace = tier.namespace()
    names = create(tier, namespace, 2, native_sidecar=True)
    pods = wl.wait_captured(tier.api, namespace, names, timeout=120)
    for pod in pods.values():
        inits = {s["name"]: s for s in pod["status"]["initContainerStatuses"]}
        waiter = inits[WAITER]["state"]["terminated"]
        assert waiter["exitCode"] == 0
        proxy = inits["istio-proxy"]["state"]["running"]
        assert proxy["startedAt"] >= waiter["finishedAt"]
        assert [c["name"] for c in pod["spec"]["initContainers"]][:2] == [WAITER, "istio-proxy"]
    tier.delete_pods(namespace)


def waiter_running(pod: dict[str, object]) -> bool:
    for status in pod.get("status", {}).get("initContainerStatuses", []):  # type: ignore[attr-defined]
        if status["name"] == WAITER and "running" in status.get("state", {}):
            return True
    return False
