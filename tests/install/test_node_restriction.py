"""The chart's node restriction, enforced by the emulator from the rendered chart, attacked with the token.

The policies come from `helm template` of the chart (Helm's engine), are installed in the emulator, and every
request below is made with lightkube (the controller's client) holding the controller's pod-bound token: the
one a compromised node hands an attacker. Each attack is what an attacker would send; the admin and other
accounts show the policy touches nobody else.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
from install_helpers import ROOT, by_kind, render
from lightkube import ApiError, Client, KubeConfig
from lightkube.resources.core_v1 import Event, Pod
from lightkube.types import PatchType

from ipnc_lab.localapi import CORE_EVENTS, PODS, LocalAPIServer, ThreadedServer
from ipnc_lab.localapi.rbac import pod_bound_extra, service_account_username
from ipnc_lab.sim.cluster import SimCluster, pod_manifest
from istio_pod_network_controller.controller import events as ev
from istio_pod_network_controller.controller.view import PodView
from istio_pod_network_controller.install.rbac import cluster_role_rules
from istio_pod_network_controller.settings import annotations as ann

ACCOUNT = service_account_username("istio-system", "istio-pod-network-controller")
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
MARK = {ann.STATUS: ann.STATUS_INITIALIZED, ann.SPEC_DIGEST: "0123456789abcdef"}


def chart_policies(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    objects = render(values or {})
    return [o for kind in POLICY_KINDS for o in by_kind(objects, kind)]


class Cluster:
    def __init__(self, server: ThreadedServer, workdir: Path) -> None:
        self.server = server
        self.api: LocalAPIServer = server.api
        self.workdir = workdir
        self.admin = Client(config=KubeConfig.from_file(self.api.kubeconfig_path))

    def client(self, name: str = ACCOUNT, *, node: str | None = "node-a", rules: Any = None) -> Client:
        """lightkube as `name`, its token bound to a pod on `node` (None: a token bound to nothing)."""
        extra = pod_bound_extra(node, f"ipnc-{node}") if node else None
        user = self.api.add_user(name, secrets.token_hex(8), rules or cluster_role_rules(), extra=extra)
        path = self.api.write_kubeconfig(self.workdir / f"{secrets.token_hex(4)}.kubeconfig", user)
        return Client(config=KubeConfig.from_file(path))

    def pod(self, name: str, node: str | None, namespace: str = "default", **extra: Any) -> dict[str, Any]:
        body = pod_manifest(
            name, namespace, node or "", annotations={"team": "payments"}, labels={"app": name}
        )
        if node is None:
            del body["spec"]["nodeName"]
        body["metadata"].update(extra)
        return self.api.store.create(PODS, namespace, body)

    def stored(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return copy.deepcopy(self.api.store.get(PODS, namespace, name))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    api = LocalAPIServer()
    api.install_policies(chart_policies())
    with api.start_in_thread() as server:
        yield Cluster(server, tmp_path)


def patch(client: Client, name: str, body: dict[str, Any], namespace: str = "default") -> None:
    client.patch(Pod, name, body, namespace=namespace, patch_type=PatchType.MERGE)


def refused(client: Client, name: str, body: dict[str, Any], namespace: str = "default") -> str:
    with pytest.raises(ApiError) as info:
        patch(client, name, body, namespace)
    assert info.value.status.code == 403, info.value.status
    message = str(info.value.status.message)
    assert "ValidatingAdmissionPolicy 'istio-pod-network-controller-pods'" in message
    return message


def test_the_chart_ships_a_policy_and_a_deny_binding_for_pods_and_events() -> None:
    objects = chart_policies()
    policies = {o["metadata"]["name"]: o for o in objects if o["kind"] == POLICY_KINDS[0]}
    bindings = [o for o in objects if o["kind"] == POLICY_KINDS[1]]
    assert set(policies) == {"istio-pod-network-controller-pods", "istio-pod-network-controller-events"}
    assert {b["spec"]["policyName"] for b in bindings} == set(policies)
    assert all(b["spec"]["validationActions"] == ["Deny"] for b in bindings)
    for policy in policies.values():
        assert policy["apiVersion"] == "admissionregistration.k8s.io/v1"
        assert policy["spec"]["failurePolicy"] == "Fail"
        (condition,) = policy["spec"]["matchConditions"]
        assert f"request.userInfo.username == '{ACCOUNT}'" == condition["expression"]
    # The keys the policy lets the controller change are exactly the ones it writes.
    own = next(
        v
        for v in policies["istio-pod-network-controller-pods"]["spec"]["variables"]
        if v["name"] == "ownKeys"
    )
    assert own["expression"] == repr([ann.STATUS, ann.SPEC_DIGEST])
    assert not chart_policies({"nodeRestriction": {"enabled": False}})


@pytest.mark.parametrize(
    ("kube_version", "values", "refused"),
    [
        ("v1.29.5", {}, True),
        ("v1.30.0", {}, False),
        ("v1.29.5", {"nodeRestriction": {"enabled": False}}, False),
    ],
)
def test_the_chart_refuses_a_cluster_older_than_1_30_while_the_restriction_is_on(
    capfd: pytest.CaptureFixture[str], kube_version: str, values: dict[str, Any], refused: bool
) -> None:
    """`helm lint --kube-version` renders against that cluster version; in lint mode Helm's `fail` is logged
    (to the process's stderr) instead of raised, which is where its message is read here."""
    capfd.readouterr()
    helm_python.lint(str(ROOT / "chart" / "istio-pod-network-controller"), values, kube_version=kube_version)
    err = capfd.readouterr().err
    says = "nodeRestriction.enabled needs Kubernetes 1.30+"
    assert (says in err) is refused, err
    if refused:
        assert f"this cluster is {kube_version}" in err and "set nodeRestriction.enabled=false" in err


def test_the_controller_marks_a_pod_of_its_own_node(cluster: Cluster) -> None:
    cluster.pod("mine", "node-a")
    patch(cluster.client(), "mine", {"metadata": {"annotations": MARK}})
    stored = cluster.stored("mine")
    assert stored["metadata"]["annotations"] == {
        **MARK,
        "team": "payments",
        ann.SIDECAR_STATUS: stored["metadata"]["annotations"][ann.SIDECAR_STATUS],
    }
    # Re-marking with a new digest, and removing its own keys, stay allowed.
    patch(cluster.client(), "mine", {"metadata": {"annotations": {ann.SPEC_DIGEST: "fedcba9876543210"}}})
    patch(cluster.client(), "mine", {"metadata": {"annotations": {ann.STATUS: None, ann.SPEC_DIGEST: None}}})
    assert ann.STATUS not in cluster.stored("mine")["metadata"]["annotations"]


def test_a_pod_on_another_node_or_unscheduled_is_refused(cluster: Cluster) -> None:
    for name, node, namespace in (("theirs", "node-b", "default"), ("dns", "node-b", "kube-system"),
                                  ("pending", None, "default")):  # fmt: skip
        cluster.pod(name, node, namespace)
        before = cluster.stored(name, namespace)
        message = refused(cluster.client(), name, {"metadata": {"annotations": MARK}}, namespace)
        assert (
            "the istio-pod-network-controller of node node-a may only write pods of its own node" in message
        )
        assert cluster.stored(name, namespace) == before


@pytest.mark.parametrize(
    ("attack", "says"),
    [
        ({"spec": {"containers": [{"name": "app", "image": "evil:latest"}]}}, "may not change a pod's spec"),
        ({"spec": {"activeDeadlineSeconds": 1}}, "may not change a pod's spec"),
        (
            {"metadata": {"labels": {"app": "mine", "role": "admin"}}},
            "labels, owner references or finalizers",
        ),
        ({"metadata": {"labels": None}}, "labels, owner references or finalizers"),
        ({"metadata": {"finalizers": ["example.com/hold"]}}, "labels, owner references or finalizers"),
        (
            {
                "metadata": {
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "x", "uid": "1"}]
                }
            },
            "labels, owner references or finalizers",
        ),
        ({"metadata": {"annotations": {"team": "attackers"}}}, "may only change its own annotations"),
        ({"metadata": {"annotations": {"team": None}}}, "may only change its own annotations"),
        ({"metadata": {"annotations": {**MARK, "sidecar.istio.io/inject": "false"}}}, "its own annotations"),
        ({"metadata": {"annotations": {ann.ENVOY_USERID: "0"}}}, "may only change its own annotations"),
    ],
)
def test_anything_but_the_mark_is_refused_on_its_own_node_too(
    cluster: Cluster, attack: dict[str, Any], says: str
) -> None:
    cluster.pod("mine", "node-a")
    before = cluster.stored("mine")
    assert says in refused(cluster.client(), "mine", attack)
    assert cluster.stored("mine") == before


def test_a_token_without_a_node_is_refused(cluster: Cluster) -> None:
    cluster.pod("mine", "node-a")
    message = refused(cluster.client(node=None), "mine", {"metadata": {"annotations": MARK}})
    assert "token names no node" in message


def test_a_widened_role_still_cannot_write_status_or_delete(cluster: Cluster) -> None:
    cluster.pod("mine", "node-a")
    wide = [{"verbs": ["*"], "resources": ["pods", "pods/status"], "apiGroups": [""]}]
    client = cluster.client(rules=wide)
    with pytest.raises(ApiError) as info:
        client.patch(
            Pod.Status,
            "mine",
            {"status": {"phase": "Failed"}},
            namespace="default",
            patch_type=PatchType.MERGE,
        )
    assert info.value.status.code == 403
    assert "may only update (patch) pods, no subresource" in str(info.value.status.message)
    with pytest.raises(ApiError) as info:
        client.delete(Pod, "mine", namespace="default")
    assert info.value.status.code == 403
    with pytest.raises(ApiError) as info:
        client.create(
            Pod.from_dict({**pod_manifest("new", "default", "node-a"), "apiVersion": "v1", "kind": "Pod"})
        )
    assert info.value.status.code == 403
    assert cluster.stored("mine")["status"]["phase"] == "Pending"


def test_admin_and_other_accounts_are_unaffected(cluster: Cluster) -> None:
    cluster.pod("theirs", "node-b", "kube-system")
    evil = {"metadata": {"labels": {"x": "y"}, "annotations": {"team": "x"}},
            "spec": {"containers": [{"name": "app", "image": "other"}]}}  # fmt: skip
    patch(cluster.admin, "theirs", evil, "kube-system")
    assert cluster.stored("theirs", "kube-system")["spec"]["containers"][0]["image"] == "other"
    other = cluster.client(service_account_username("default", "deployer"), node="node-a",
                           rules=[{"verbs": ["patch"], "resources": ["pods"]}])  # fmt: skip
    patch(other, "theirs", {"metadata": {"labels": {"y": "z"}}}, "kube-system")


def event(pod: dict[str, Any], node: str, **changes: Any) -> Event:
    body = ev.build_event(
        PodView.of(pod), ev.WARNING, ev.APPLY_FAILED, "capture rules could not be installed", node
    )
    body.update(changes)
    return Event.from_dict(body)


def test_events_must_come_from_the_controller_on_its_own_node(cluster: Cluster) -> None:
    pod = cluster.pod("mine", "node-a")
    client = cluster.client()
    client.create(event(pod, "node-a"))
    assert len(cluster.api.store.objects(CORE_EVENTS, "default")) == 1
    for forged in (
        event(pod, "node-b"),
        event(pod, "node-a", source={"component": "kubelet", "host": "node-a"}),
        event(pod, "node-a", reportingComponent="kubelet"),
        event(
            pod, "node-a", involvedObject={**event(pod, "node-a").involvedObject.to_dict(), "kind": "Node"}
        ),
    ):
        with pytest.raises(ApiError) as info:
            client.create(forged)
        assert info.value.status.code == 403, forged
        assert "ValidatingAdmissionPolicy 'istio-pod-network-controller-events'" in str(
            info.value.status.message
        )
    with pytest.raises(ApiError) as info:
        client.create(event(pod, "node-a"))  # deterministic Warning name: recorded already
    assert info.value.status.code == 409
    name = cluster.api.store.objects(CORE_EVENTS, "default")[0]["metadata"]["name"]
    with pytest.raises(ApiError) as info:
        client.patch(Event, name, {"message": "all is well"}, namespace="default", patch_type=PatchType.MERGE)
    assert info.value.status.code == 403  # RBAC: the ClusterRole has no `patch events` any more
    assert len(cluster.api.store.objects(CORE_EVENTS, "default")) == 1


def test_a_node_event_only_about_the_tokens_own_node(cluster: Cluster) -> None:
    """The preflight's PreflightFailed Event names the controller's Node: allowed for its own node only."""
    from istio_pod_network_controller.controller.preflight import node_event

    client = cluster.client()
    client.create(Event.from_dict(node_event("node-a", "rule tools missing")))
    with pytest.raises(ApiError) as info:
        client.create(Event.from_dict(node_event("node-b", "rule tools missing")))
    assert info.value.status.code == 403
    forged = node_event("node-b", "rule tools missing")
    forged["source"]["host"] = forged["reportingInstance"] = "node-a"
    with pytest.raises(ApiError) as info:
        client.create(Event.from_dict(forged))
    assert info.value.status.code == 403
    assert len(cluster.api.store.objects(CORE_EVENTS, "default")) == 1


def test_without_the_policies_the_same_token_rewrites_any_pod() -> None:
    """The hole the policies close, shown with the simulated cluster's own node-bound controller token."""
    with SimCluster(node_restriction=False) as sim:
        sim.store.create(PODS, "kube-system", pod_manifest("dns", "kube-system", "node-b"))
        stolen = Client(config=KubeConfig.from_file(sim.kubeconfig(node="node-a")))
        evil = {
            "spec": {"containers": [{"name": "app", "image": "evil"}]},
            "metadata": {"labels": {"x": "y"}},
        }
        patch(stolen, "dns", evil, "kube-system")
        assert sim.store.get(PODS, "kube-system", "dns")["spec"]["containers"][0]["image"] == "evil"
    with SimCluster() as sim:
        sim.store.create(PODS, "kube-system", pod_manifest("dns", "kube-system", "node-b"))
        stolen = Client(config=KubeConfig.from_file(sim.kubeconfig(node="node-a")))
        refused(stolen, "dns", evil, "kube-system")
