"""The real `run` controller under the chart's node restriction (policies rendered from the chart).

Node A's controller initializes its own pod through the policy; then its very token (read from the kubeconfig
the controller runs with, as an attacker holding node A would) is refused on node B's pod and on anything
but the mark of its own pod; the admin is not.
"""

from __future__ import annotations

import pytest
import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

from ipnc_lab.localapi import PODS
from ipnc_lab.localapi.resources import VALIDATING_ADMISSION_POLICIES, VALIDATING_ADMISSION_POLICY_BINDINGS
from ipnc_lab.sim.cluster import CONTROLLER_USER, SimCluster, pod_manifest
from istio_pod_network_controller.settings import annotations as ann

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]


def denied(client: Client, name: str, body: dict[str, object]) -> str:
    with pytest.raises(ApiError) as info:
        client.patch(Pod, name, body, namespace="default", patch_type=PatchType.MERGE)
    assert info.value.status.code == 403, info.value.status
    return str(info.value.status.message)


def test_node_a_marks_its_own_pod_and_its_token_cannot_touch_node_b_or_more_than_the_mark() -> None:
    with SimCluster() as cluster:
        names = {o["metadata"]["name"] for o in cluster.store.objects(VALIDATING_ADMISSION_POLICIES)}
        assert names == {"istio-pod-network-controller-pods", "istio-pod-network-controller-events"}
        assert len(cluster.store.objects(VALIDATING_ADMISSION_POLICY_BINDINGS)) == 2
        node_a = cluster.add_node("ipnra")
        mine = cluster.add_pod(node_a, "mine")
        cluster.store.create(PODS, "default", pod_manifest("theirs", "default", "ipnr-node-b"))
        controller = cluster.start_controller(node_a)
        controller.wait_ready()
        cluster.wait_initialized([mine], 20, controller.log)
        marks = [r for r in cluster.api.requests.records() if r.verb == "patch" and r.name == "mine"]
        assert marks and all(r.status == 200 and r.user == CONTROLLER_USER for r in marks)
        assert "Initialized" in cluster.reasons(mine)  # its Event passed the events policy too

        kubeconfig = cluster.kubeconfig(node=node_a.name)
        token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
        assert cluster.api.api.auth.authenticate(token).extra["authentication.kubernetes.io/node-name"] == (
            node_a.name,
        )
        stolen = Client(config=KubeConfig.from_file(kubeconfig))
        mark = {"metadata": {"annotations": {ann.STATUS: ann.STATUS_INITIALIZED}}}
        assert f"of node {node_a.name} may only write pods of its own node" in denied(stolen, "theirs", mark)
        image = {"spec": {"containers": [{"name": "app", "image": "evil"}]}}
        assert "may not change a pod's spec" in denied(stolen, mine.name, image)
        assert "labels" in denied(stolen, mine.name, {"metadata": {"labels": {"role": "x"}}})
        inject = {"metadata": {"annotations": {ann.SIDECAR_INJECT: "false"}}}
        assert "its own annotations" in denied(stolen, mine.name, inject)
        assert ann.STATUS not in (
            cluster.store.get(PODS, "default", "theirs")["metadata"].get("annotations") or {}
        )

        admin = Client(config=KubeConfig.from_file(cluster.api.kubeconfig_path))
        admin.patch(Pod, "theirs", image, namespace="default", patch_type=PatchType.MERGE)
        assert cluster.store.get(PODS, "default", "theirs")["spec"]["containers"][0]["image"] == "evil"
        assert controller.terminate() == 0
