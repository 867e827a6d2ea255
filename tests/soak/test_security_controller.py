"""Controller-level security checks, end to end (root): the real controller as the chart's RBAC user.

- a hostNetwork pod is never processed, even when every selection rule asks for it at once;
- annotation edits after initialization change the rules only through a re-apply the controller logs and
  reports (Reconfigured), and an invalid value or interceptionMode NONE never removes capture (fail closed,
  with a Warning saying the rules are kept);
- no annotation value is ever followed as a path (a FIFO named in every annotation is never opened).
"""

from __future__ import annotations

import errno
import os
import tempfile

import pytest

from ipnc_lab.sim.cluster import CONTROLLER_USER, SimCluster, host_rules
from ipnc_lab.sim.controller import wait_for
from ipnc_lab.sim.netns import holds_capture_rules
from ipnc_lab.sim.node import SimNode, SimPod
from ipnc_lab.sim.traffic import Server, connect
from istio_pod_network_controller.settings import annotations as ann

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
APP_UID = 1000
PATH_KEYS = (
    ann.INTERCEPTION_MODE, ann.INCLUDE_INBOUND_PORTS, ann.EXCLUDE_INBOUND_PORTS,
    ann.INCLUDE_OUTBOUND_IP_RANGES, ann.EXCLUDE_OUTBOUND_IP_RANGES, ann.INCLUDE_OUTBOUND_PORTS,
    ann.EXCLUDE_OUTBOUND_PORTS,
    ann.EXCLUDE_INTERFACES, ann.REROUTE_VIRTUAL_INTERFACES, ann.KUBEVIRT_INTERFACES, ann.ENVOY_PORT,
    ann.ENVOY_USERID, ann.ENVOY_GROUPID, ann.CAPTURE_DNS, ann.IPV6,
)  # fmt: skip


def landed(node: SimNode, pod: SimPod, *, inbound: bool) -> str | None:
    """Which listener got an inbound connection to app:8080, or the app's outbound one to the node:9090."""
    assert pod.ip and pod.netns
    if inbound:
        return connect(node.node, pod.ip, 8080).label
    return connect(pod.netns, node.gateway, 9090, uid=APP_UID, gid=APP_UID).label


def test_host_network_pod_with_every_selection_rule_is_never_processed() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipnsh")
        cluster.add_namespace("everything", {ann.LEGACY_INITIALIZE: "true"})
        every = {ann.LEGACY_INITIALIZE: "true", ann.INTERCEPTION_MODE: "TPROXY", ann.CAPTURE_DNS: "true"}
        host = cluster.add_pod(node, "host", "everything", host_network=True, annotations=every)
        mesh = cluster.add_pod(node, "mesh", "everything")  # proves the controller was working
        before = host_rules()
        ctl = cluster.start_controller(node, ["--repair-interval", "1"])
        ctl.wait_ready()
        cluster.wait_initialized([mesh], 15, ctl.log)
        wait_for(lambda: "HostNetworkSkipped" in cluster.reasons(host), 5, "hostNetwork warning")
        cluster.edit_annotations(host, {ann.EXCLUDE_INBOUND_PORTS: "9999"})  # an event: judged again
        wait_for(lambda: ctl.metric("istio_pod_network_controller_pods_skipped_total", "host-network") >= 2,
                 5, "hostNetwork pod judged twice")  # fmt: skip
        assert not cluster.initialized(host)
        assert cluster.reasons(host) == ["HostNetworkSkipped"]
        assert cluster.api.requests.count(verb="patch", name="host") == 0
        assert host_rules() == before
        assert ctl.terminate() == 0


def test_annotation_edits_after_init_reapply_visibly_and_never_remove_capture() -> None:
    with SimCluster() as cluster, Server() as server:
        node = cluster.add_node("ipnsw")
        pod = cluster.add_pod(node, "app")
        server.add(pod.netns, "app", 8080, bind6=None)
        server.add(pod.netns, "envoy-in", 15006, bind6=None)
        server.add(pod.netns, "envoy-out", 15001, bind6=None)
        server.add(node.node, "remote", 9090, bind6=None)
        server.start()
        ctl = cluster.start_controller(node, ["--repair-interval", "1"])
        ctl.wait_ready()
        cluster.wait_initialized([pod], 15, ctl.log)
        assert landed(node, pod, inbound=True) == "envoy-in"
        assert landed(node, pod, inbound=False) == "envoy-out"

        def edit_and_wait(changes: dict[str, str], reconfigured: int) -> None:
            cluster.edit_annotations(pod, changes)
            wait_for(lambda: cluster.reasons(pod).count("Reconfigured") == reconfigured, 10, "Reconfigured")
            wait_for(lambda: cluster.verify(pod).in_place, 5, "rules of the new spec")

        # Weakening edits are honoured only through a re-apply that is logged and reported.
        edit_and_wait({ann.EXCLUDE_INBOUND_PORTS: "8080"}, 1)
        assert landed(node, pod, inbound=True) == "app"
        edit_and_wait({ann.INCLUDE_OUTBOUND_IP_RANGES: ""}, 2)
        assert landed(node, pod, inbound=False) == "remote"
        assert ctl.log(10**6).count("Reconfigured: interception annotations changed") == 2
        patches = cluster.api.requests.count(verb="patch", name="app")
        assert patches == 3  # initialized + two reconfigurations, nothing else wrote to the pod

        # Back to full capture, then edits that would remove capture: refused, rules kept, Warnings say so.
        edit_and_wait({ann.EXCLUDE_INBOUND_PORTS: "", ann.INCLUDE_OUTBOUND_IP_RANGES: "*"}, 3)
        kept = cluster.annotations(pod)
        invalid = "InvalidInterceptionConfig"
        for changes, reason, says in (
            ({ann.EXCLUDE_INBOUND_PORTS: "80,http"}, invalid, "installed before are kept"),
            ({ann.EXCLUDE_INBOUND_PORTS: "", ann.INTERCEPTION_MODE: "NONE"}, "CaptureKept", "rules are kept"),
        ):
            cluster.edit_annotations(pod, changes)
            wait_for(lambda r=reason: r in cluster.reasons(pod), 10, f"{reason} warning\n{ctl.log()}")
            (warning,) = [e for e in cluster.events(pod) if e["reason"] == reason]
            assert warning["type"] == "Warning" and says in warning["message"], warning["message"]
            assert says in ctl.log(10**6)
            assert landed(node, pod, inbound=True) == "envoy-in"
            assert landed(node, pod, inbound=False) == "envoy-out"
            assert cluster.annotations(pod)[ann.SPEC_DIGEST] == kept[ann.SPEC_DIGEST]
        assert cluster.reasons(pod).count("Reconfigured") == 3
        assert cluster.api.requests.count(verb="patch", name="app") == patches + 1
        assert {r.user for r in cluster.api.requests.records() if r.resource} == {CONTROLLER_USER}
        assert ctl.terminate() == 0


def test_no_annotation_value_is_ever_followed_as_a_path() -> None:
    workdir = tempfile.mkdtemp(prefix="ipnc-fifo-")
    fifo = os.path.join(workdir, "bait")
    os.mkfifo(fifo)
    opened: list[str] = []

    def reader_present() -> bool:
        """Opening a FIFO's write end without blocking fails with ENXIO while nobody has it open to read."""
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return False
        os.close(fd)
        opened.append(fifo)
        return True

    try:
        with SimCluster() as cluster:
            node = cluster.add_node("ipnsp")
            pods = [
                cluster.add_pod(node, f"path-{i}", annotations={key: fifo}) for i, key in enumerate(PATH_KEYS)
            ]
            legacy = {ann.LEGACY_INITIALIZE: fifo}
            pods.append(cluster.add_pod(node, "path-legacy", mesh=False, annotations=legacy))
            ctl = cluster.start_controller(node)
            ctl.wait_ready()

            def all_refused() -> bool:
                reader_present()
                return all("InvalidInterceptionConfig" in cluster.reasons(p) for p in pods[:-1])

            wait_for(all_refused, 15, f"every path annotation refused\n{ctl.log()}")
            for _ in range(20):
                reader_present()
            assert not opened, "the controller opened a path taken from an annotation"
            for pod, key in zip(pods, PATH_KEYS, strict=False):
                (warning,) = cluster.events(pod)
                assert key in warning["message"]
            for pod in pods:
                assert not cluster.initialized(pod)
                assert pod.netns and not holds_capture_rules(pod.netns)
            assert ctl.terminate() == 0
    finally:
        os.unlink(fifo)
        os.rmdir(workdir)
