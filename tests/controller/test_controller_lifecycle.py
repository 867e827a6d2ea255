"""The kubelet's pod lifecycle against the real controller: recreated sandboxes, container restarts, a node
reboot while the controller is down, pods recreated under the same name, and a decoy namespace.

The simulator (`ipnc_lab.sim`) does what a real kubelet does: a new sandbox is a new network namespace
with a new IP and new processes, reported by status updates in either order. The repair pass is disabled
(`--repair-interval 0`) wherever a capture must come from the pod update itself, so nothing here can pass
by waiting for the periodic verify.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from ipnc_lab.sim.cluster import SimCluster, kubelet_status, set_status
from ipnc_lab.sim.controller import ControllerProcess, wait_for
from ipnc_lab.sim.netns import holds_capture_rules
from ipnc_lab.sim.node import SimNode, SimPod
from istio_pod_network_controller.settings import annotations as ann

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
NO_REPAIR = ("--repair-interval", "0", "--relist-jitter", "0.2")
METRIC = "istio_pod_network_controller_pods_{}_total"


def start(cluster: SimCluster, node: SimNode, *extra: str) -> ControllerProcess:
    return cluster.start_controller(node, [*NO_REPAIR, *extra])


def start_initialized(
    cluster: SimCluster, node: SimNode, pods: list[SimPod], timeout: float = 15
) -> ControllerProcess:
    """A ready controller (repair pass off) that has initialized `pods`."""
    ctl = start(cluster, node)
    ctl.wait_ready()
    cluster.wait_initialized(pods, timeout, ctl.log)
    return ctl


def held_netns(ctl: ControllerProcess) -> set[int]:
    """Inodes of the network namespaces the controller process holds open."""
    inodes = set()
    for fd in Path(f"/proc/{ctl.pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("net:["):
            inodes.add(int(target[5:-1]))
    return inodes


def sandbox_ino(pod: SimPod) -> int:
    assert pod.netns is not None
    return pod.netns.pinned.id.ino


def in_place(cluster: SimCluster, pod: SimPod) -> bool:
    return cluster.verify(pod).in_place


def patches(cluster: SimCluster, pod: SimPod) -> int:
    return cluster.api.requests.count(verb="patch", resource="pods", name=pod.name)


@pytest.mark.parametrize("order", ["ip-first", "containers-first"])
def test_recreated_sandbox_is_captured_from_the_update_and_counted(order: str) -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncs")
        pod = cluster.add_pod(node, "web")
        ctl = start_initialized(cluster, node, [pod])
        old = sandbox_ino(pod)
        wait_for(lambda: old in held_netns(ctl), 10, "the sandbox pinned")

        old_ip = pod.ip
        cluster.recreate_sandbox(node, pod, order)
        announced = time.monotonic()
        assert pod.ip != old_ip and pod.sandboxes == 2
        wait_for(lambda: in_place(cluster, pod), 15, f"new sandbox captured\n{ctl.log()}")
        elapsed = time.monotonic() - announced
        # Events are sent in the background, so they may reach the API in either order
        wait_for(lambda: len(cluster.reasons(pod)) == 2, 10, "Reinitialized event")
        assert sorted(cluster.reasons(pod)) == ["Initialized", "Reinitialized"]
        (event,) = [e for e in cluster.events(pod) if e["reason"] == "Reinitialized"]
        assert event["type"] == "Normal" and "net:[" not in event["message"]
        assert ctl.metric(METRIC.format("reinitialized")) == 1
        assert ctl.metric(METRIC.format("repaired")) == 0
        assert patches(cluster, pod) == 1  # marked once: the mark already says initialized
        # the dead sandbox is released, the new one pinned
        wait_for(lambda: old not in held_netns(ctl), 10, "old sandbox released")
        assert sandbox_ino(pod) in held_netns(ctl)
        print(f"\n{order}: new sandbox captured {elapsed * 1000:.0f} ms after the status update")
        assert ctl.terminate() == 0


def test_container_restart_keeps_the_sandbox_and_its_rules() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncc")
        pod = cluster.add_pod(node, "web")
        ctl = start_initialized(cluster, node, [pod])
        sandbox = sandbox_ino(pod)
        wait_for(lambda: cluster.reasons(pod) == ["Initialized"], 10, "Initialized event")
        verifies = ctl.metric("istio_pod_network_controller_stage_seconds_count", 'stage="verify"')

        cluster.restart_container(node, pod)
        # the replaced container makes the controller look at the node: one verify, in the same sandbox
        wait_for(
            lambda: (
                ctl.metric("istio_pod_network_controller_stage_seconds_count", 'stage="verify"') > verifies
            ),
            15,
            f"verify after the restart\n{ctl.log()}",
        )
        assert in_place(cluster, pod)
        assert cluster.reasons(pod) == ["Initialized"]
        assert ctl.metric(METRIC.format("reinitialized")) == 0
        assert patches(cluster, pod) == 1
        assert sandbox in held_netns(ctl)
        assert ctl.terminate() == 0


def test_node_reboot_with_the_controller_down_recaptures_every_mesh_pod_once() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncb")
        mesh = [cluster.add_pod(node, f"mesh-{i}") for i in range(6)]
        plain = cluster.add_pod(node, "plain", mesh=False)
        ctl = start_initialized(cluster, node, mesh, 20)
        assert ctl.terminate() == 0

        old_ips = {p.name: p.ip for p in mesh}
        cluster.reboot(node)
        assert all(p.ip != old_ips[p.name] and p.sandboxes == 2 for p in mesh)
        assert not any(holds_capture_rules(p.netns) for p in mesh if p.netns)

        again = start(cluster, node)
        again.wait_ready()  # readiness comes after every cached pod was reconciled once
        for pod in mesh:
            assert in_place(cluster, pod), pod.name  # exact rules: nothing missing, no duplicates
            assert patches(cluster, pod) == 1, pod.name  # never marked twice
            assert sandbox_ino(pod) in held_netns(again)
        assert plain.netns and not holds_capture_rules(plain.netns) and not cluster.initialized(plain)
        # a restarted controller has no record of the old sandboxes: it finds the rules missing
        wait_for(lambda: all("Repaired" in cluster.reasons(p) for p in mesh), 10, "Repaired events")
        assert again.metric(METRIC.format("repaired")) == len(mesh)
        assert again.metric(METRIC.format("initialized")) == 0
        assert again.terminate() == 0


def test_pod_recreated_under_the_same_name_is_a_new_pod() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncn")
        first = cluster.add_pod(node, "web")
        ctl = start_initialized(cluster, node, [first])
        old_uid, old_ino = first.uid, sandbox_ino(first)
        wait_for(lambda: old_ino in held_netns(ctl), 10, "first pod pinned")

        second = cluster.recreate_pod(node, first)
        assert second.uid != old_uid
        cluster.wait_initialized([second], 15, ctl.log)
        assert in_place(cluster, second)
        wait_for(lambda: old_ino not in held_netns(ctl), 10, "deleted pod's sandbox released")
        assert sandbox_ino(second) in held_netns(ctl)
        assert ctl.metric(METRIC.format("initialized")) == 2
        assert ctl.metric(METRIC.format("reinitialized")) == 0
        wait_for(lambda: len(cluster.events(second)) == 2, 10, "the new pod's Initialized event")
        assert sorted(e["involvedObject"]["uid"] for e in cluster.events(second)) == sorted(
            [old_uid, second.uid]
        )
        assert ctl.terminate() == 0


# --- the decoy namespace (a tenant process in the pod's cgroup, uid 1000, no capabilities) ------------


def start_decoy(node: SimNode, pod: SimPod) -> subprocess.Popen[str]:
    """Exactly the attack: a new user+net namespace holding the pod IP on lo, in the pod's cgroup."""
    assert pod.ip
    script = f"ip link set lo up; ip addr add {pod.ip}/32 dev lo; sleep 1000"
    decoy = node.spawn(pod, ["unshare", "-Urn", "sh", "-c", script], uid=1000, gid=1000)
    decoy_ns = Path(f"/proc/{decoy.pid}/ns/net")

    def holds_ip() -> bool:
        if decoy.poll() is not None:
            raise AssertionError(f"decoy exited: {decoy.stderr.read() if decoy.stderr else ''}")
        argv = ["nsenter", f"--net={decoy_ns}", "ip", "-o", "-4", "addr"]
        shown = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        return f"{pod.ip}/32" in shown.stdout

    wait_for(holds_ip, 10, "the decoy holds the pod IP")
    assert os.stat(decoy_ns).st_ino != sandbox_ino(pod)
    return decoy


def nat_rules(pod: SimPod, backend: str) -> list[str]:
    assert pod.netns
    return pod.netns.exec([f"iptables-{backend}-save", "-t", "nat"]).splitlines()


def delete_output_jump(pod: SimPod, backend: str) -> None:
    """The app (root in the pod's netns, so NET_ADMIN there) deletes the OUTPUT jump into ISTIO_OUTPUT."""
    assert pod.netns
    (jump,) = [r for r in nat_rules(pod, backend) if r.startswith("-A OUTPUT") and "-j ISTIO_OUTPUT" in r]
    pod.netns.exec([f"iptables-{backend}", "-t", "nat", "-D", *shlex.split(jump)[1:]])
    assert jump not in nat_rules(pod, backend)


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_a_decoy_namespace_never_steers_capture_or_switches_off_repair(backend: str) -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncd")
        early = cluster.add_pod(node, "decoyed-early")
        late = cluster.add_pod(node, "decoyed-late")
        start_decoy(node, early)  # before the controller ever saw the pod

        ctl = cluster.start_controller(node, ["--backend", backend, "--repair-interval", "1"])
        ctl.wait_ready()
        cluster.wait_initialized([early, late], 15, ctl.log)
        start_decoy(node, late)  # after initialization
        for pod in (early, late):
            assert in_place(cluster, pod), pod.name  # the rules are in the sandbox, not in the decoy
            assert sandbox_ino(pod) in held_netns(ctl)
        wait_for(
            lambda: all("ForeignNetworkNamespace" in cluster.reasons(p) for p in (early, late)),
            15,
            f"decoy warnings\n{ctl.log()}",
        )
        for pod in (early, late):
            (warning,) = [e for e in cluster.events(pod) if e["reason"] == "ForeignNetworkNamespace"]
            assert warning["type"] == "Warning"
            assert "net:[" not in warning["message"] and "pid" not in warning["message"]
        assert ctl.metric(METRIC.format("foreign_netns")) == 2

        # repair still works: the app deletes the OUTPUT jump, the periodic verify puts it back
        for pod in (early, late):
            delete_output_jump(pod, backend)
        wait_for(lambda: all(in_place(cluster, p) for p in (early, late)), 15, f"rules repaired\n{ctl.log()}")
        wait_for(lambda: all("Repaired" in cluster.reasons(p) for p in (early, late)), 10, "Repaired events")
        assert all(patches(cluster, p) == 1 for p in (early, late))
        assert cluster.annotations(early)[ann.STATUS] == ann.STATUS_INITIALIZED
        assert ctl.terminate() == 0


def test_a_finished_pod_lets_go_of_its_sandbox() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncf")
        pod = cluster.add_pod(node, "job")
        ctl = start_initialized(cluster, node, [pod])
        sandbox = sandbox_ino(pod)
        wait_for(lambda: sandbox in held_netns(ctl), 10, "the sandbox pinned")
        wait_for(lambda: cluster.reasons(pod) == ["Initialized"], 10, "Initialized event")
        set_status(
            cluster.store, pod.namespace, pod.name, kubelet_status(pod.ip, "Succeeded", host_ip=pod.host_ip)
        )
        wait_for(lambda: sandbox not in held_netns(ctl), 10, "a finished pod's sandbox released")
        assert cluster.reasons(pod) == ["Initialized"]  # finishing warns about nothing
        assert ctl.terminate() == 0
