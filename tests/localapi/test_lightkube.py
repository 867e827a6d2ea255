"""Conformance of CRUD, errors, patches, status and finalizers, driven through lightkube."""

from __future__ import annotations

import threading

import lightkube
import pytest
from lightkube import operators as op
from lightkube.models.core_v1 import Container, PodSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Node, Pod
from lightkube.resources.events_v1 import Event as EventV1
from lightkube.types import PatchType

from ipnc_lab.localapi import PODS, LocalAPIServer, ThreadedServer

from .conftest import Raw, pod_manifest


def make_pod(name: str, namespace: str = "default", **labels: str) -> Pod:
    return Pod(
        metadata=ObjectMeta(name=name, namespace=namespace, labels=labels or None),
        spec=PodSpec(containers=[Container(name="app", image="busybox")]),
    )


async def test_create_get_fills_metadata_and_rv_is_monotonic(client: lightkube.AsyncClient) -> None:
    a = await client.create(make_pod("a"))
    b = await client.create(make_pod("b"))
    assert a.metadata.uid
    assert a.metadata.uid != b.metadata.uid
    assert a.metadata.creationTimestamp is not None
    assert a.metadata.generation == 1
    assert int(b.metadata.resourceVersion) > int(a.metadata.resourceVersion)
    got = await client.get(Pod, "a", namespace="default")
    assert got.metadata.resourceVersion == a.metadata.resourceVersion
    assert got.status.phase == "Pending"


async def test_errors_are_status_objects(client: lightkube.AsyncClient) -> None:
    await client.create(make_pod("dup"))
    with pytest.raises(lightkube.ApiError) as exc:
        await client.create(make_pod("dup"))
    assert (exc.value.status.code, exc.value.status.reason) == (409, "AlreadyExists")
    assert exc.value.status.message == 'pods "dup" already exists'
    with pytest.raises(lightkube.ApiError) as exc:
        await client.get(Pod, "nope", namespace="default")
    assert (exc.value.status.code, exc.value.status.reason) == (404, "NotFound")
    assert exc.value.status.details.name == "nope"
    with pytest.raises(lightkube.ApiError) as exc:
        await client.create(make_pod("x", namespace="no-such-ns"))
    assert exc.value.status.code == 404
    assert exc.value.status.message == 'namespaces "no-such-ns" not found'


async def test_namespace_requirement_can_be_switched_off() -> None:
    async with LocalAPIServer(require_namespace=False, namespaces=()) as api:
        c = lightkube.AsyncClient(config=lightkube.KubeConfig.from_file(api.kubeconfig_path))
        try:
            created = await c.create(make_pod("p", namespace="anywhere"))
            assert created.metadata.namespace == "anywhere"
            assert [ns async for ns in c.list(Namespace)] == []
        finally:
            await c.close()


async def test_generate_name(client: lightkube.AsyncClient) -> None:
    pod = make_pod("")
    pod.metadata.name = None
    pod.metadata.generateName = "gen-"
    created = await client.create(pod)
    assert created.metadata.name.startswith("gen-")
    assert len(created.metadata.name) == len("gen-") + 5


async def test_list_selectors_and_scopes(client: lightkube.AsyncClient, raw: Raw) -> None:
    await client.create(Namespace(metadata=ObjectMeta(name="other")))
    await client.create(make_pod("web-1", app="web", tier="front"))
    await client.create(make_pod("web-2", app="web"))
    await client.create(make_pod("db-1", app="db"))
    await client.create(make_pod("web-3", namespace="other", app="web"))
    await client.patch(
        Pod.Status, "db-1", {"status": {"phase": "Running"}}, namespace="default", patch_type=PatchType.MERGE
    )

    async def names(**kw: object) -> list[str]:
        return sorted([p.metadata.name async for p in client.list(Pod, **kw)])  # type: ignore[arg-type]

    assert await names(namespace="default") == ["db-1", "web-1", "web-2"]
    assert await names(namespace="*") == ["db-1", "web-1", "web-2", "web-3"]
    assert await names(namespace="*", labels={"app": "web"}) == ["web-1", "web-2", "web-3"]
    assert await names(namespace="default", labels={"app": op.not_equal("web")}) == ["db-1"]
    assert await names(namespace="*", labels={"app": op.in_(["db", "x"])}) == ["db-1"]
    assert await names(namespace="default", labels={"app": op.not_in(["web"])}) == ["db-1"]
    assert await names(namespace="default", labels={"tier": op.exists()}) == ["web-1"]
    assert await names(namespace="default", labels={"tier": op.not_exists()}) == ["db-1", "web-2"]
    assert await names(namespace="*", fields={"metadata.namespace": "other"}) == ["web-3"]
    assert await names(namespace="*", fields={"metadata.name": "web-2"}) == ["web-2"]
    assert await names(namespace="*", fields={"status.phase": "Running"}) == ["db-1"]
    assert await names(namespace="*", fields={"status.phase": op.not_equal("Running")}) == [
        "web-1",
        "web-2",
        "web-3",
    ]

    status, body, _ = await raw.request("GET", "/api/v1/pods", limit="1", labelSelector="app==db")
    assert status == 200
    assert body["kind"] == "PodList"
    assert int(body["metadata"]["resourceVersion"]) == raw.api.store.resource_version
    assert [i["metadata"]["name"] for i in body["items"]] == ["db-1"]
    for bad in ({"labelSelector": "app in (x"}, {"fieldSelector": "spec.bogus=1"}):
        status, body, _ = await raw.request("GET", "/api/v1/pods", **bad)
        assert (status, body["reason"]) == (400, "BadRequest")


async def test_field_selector_on_node_name(client: lightkube.AsyncClient) -> None:
    pod = make_pod("on-n1")
    pod.spec.nodeName = "n1"
    await client.create(pod)
    await client.create(make_pod("unscheduled"))
    got = [p.metadata.name async for p in client.list(Pod, namespace="*", fields={"spec.nodeName": "n1"})]
    assert got == ["on-n1"]
    got = [p.metadata.name async for p in client.list(Pod, namespace="*", fields={"spec.nodeName": ""})]
    assert got == ["unscheduled"]


async def test_update_with_stale_resource_version_conflicts(client: lightkube.AsyncClient) -> None:
    created = await client.create(make_pod("p"))
    created.metadata.labels = {"v": "1"}
    updated = await client.replace(created)
    assert updated.metadata.labels == {"v": "1"}
    assert int(updated.metadata.resourceVersion) > int(created.metadata.resourceVersion)
    created.metadata.labels = {"v": "2"}
    with pytest.raises(lightkube.ApiError) as exc:
        await client.replace(created)  # still carries the old resourceVersion
    assert (exc.value.status.code, exc.value.status.reason) == (409, "Conflict")
    assert "the object has been modified" in exc.value.status.message
    # A patch that carries a stale resourceVersion is a failed precondition too.
    with pytest.raises(lightkube.ApiError) as exc:
        await client.patch(
            Pod,
            "p",
            {"metadata": {"resourceVersion": created.metadata.resourceVersion}},
            namespace="default",
            patch_type=PatchType.MERGE,
        )
    assert exc.value.status.code == 409


async def test_every_patch_type(client: lightkube.AsyncClient, raw: Raw) -> None:
    manifest = pod_manifest("p", app="web")
    manifest["spec"]["containers"].append({"name": "side", "image": "s1"})
    manifest["spec"]["volumes"] = [{"name": "v1", "emptyDir": {}}, {"name": "v2", "emptyDir": {}}]
    await client.create(Pod.from_dict(manifest))

    merged = await client.patch(
        Pod,
        "p",
        {"metadata": {"labels": {"app": None, "x": "1"}}},
        namespace="default",
        patch_type=PatchType.MERGE,
    )
    assert merged.metadata.labels == {"x": "1"}

    smp = {
        "metadata": {"annotations": {"a": "b"}},
        "spec": {
            "containers": [{"name": "app", "image": "v2"}],
            "volumes": [{"name": "v1", "$patch": "delete"}],
        },
    }
    patched = await client.patch(Pod, "p", smp, namespace="default", patch_type=PatchType.STRATEGIC)
    assert [(c.name, c.image) for c in patched.spec.containers] == [("app", "v2"), ("side", "s1")]
    assert [v.name for v in patched.spec.volumes] == ["v2"]
    assert patched.metadata.annotations == {"a": "b"}
    assert patched.metadata.labels == {"x": "1"}

    ops = [
        {"op": "test", "path": "/metadata/labels/x", "value": "1"},
        {"op": "add", "path": "/metadata/labels/y", "value": "2"},
    ]
    patched = await client.patch(Pod, "p", ops, namespace="default", patch_type=PatchType.JSON)
    assert patched.metadata.labels == {"x": "1", "y": "2"}

    for bad_ops in (
        [{"op": "test", "path": "/metadata/labels/x", "value": "nope"}],
        [{"op": "remove", "path": "/spec/nothing/here"}],
    ):
        with pytest.raises(lightkube.ApiError) as exc:
            await client.patch(Pod, "p", bad_ops, namespace="default", patch_type=PatchType.JSON)
        assert (exc.value.status.code, exc.value.status.reason) == (422, "Invalid")

    status, body, _ = await raw.request(
        "PATCH", "/api/v1/namespaces/default/pods/p", {"a": 1}, content_type="application/apply-patch+yaml"
    )
    assert (status, body["reason"]) == (415, "UnsupportedMediaType")
    status, body, _ = await raw.request(
        "PATCH",
        "/api/v1/namespaces/default/pods/p",
        b"{not json",
        content_type="application/merge-patch+json",
    )
    assert (status, body["reason"]) == (400, "BadRequest")
    status, body, _ = await raw.request(
        "PATCH", "/api/v1/namespaces/default/pods/p", {"a": 1}, content_type="application/json-patch+json"
    )
    assert (status, body["reason"]) == (400, "BadRequest")


async def test_status_subresource_separation(client: lightkube.AsyncClient, raw: Raw) -> None:
    await client.create(make_pod("p"))
    # The main resource ignores status changes ...
    patched = await client.patch(
        Pod,
        "p",
        {"status": {"phase": "Running"}, "metadata": {"labels": {"l": "1"}}},
        namespace="default",
        patch_type=PatchType.MERGE,
    )
    assert patched.status.phase == "Pending"
    assert patched.metadata.labels == {"l": "1"}
    # ... and the status subresource changes only status.
    patched = await client.patch(
        Pod.Status,
        "p",
        {"status": {"phase": "Running"}, "metadata": {"labels": {"l": "2"}}},
        namespace="default",
        patch_type=PatchType.MERGE,
    )
    assert patched.status.phase == "Running"
    assert patched.metadata.labels == {"l": "1"}
    # PUT follows the same split.
    path = "/api/v1/namespaces/default/pods/p"
    _, current, _ = await raw.request("GET", path)
    current["status"]["phase"] = "Succeeded"
    current["metadata"]["labels"] = {"l": "3"}
    status, body, _ = await raw.request("PUT", path, current)
    assert status == 200
    assert (body["status"]["phase"], body["metadata"]["labels"]) == ("Running", {"l": "3"})
    current["metadata"]["resourceVersion"] = body["metadata"]["resourceVersion"]
    current["metadata"]["labels"] = {"l": "4"}
    status, body, _ = await raw.request("PUT", path + "/status", current)
    assert status == 200
    assert (body["status"]["phase"], body["metadata"]["labels"]) == ("Succeeded", {"l": "3"})


async def test_no_op_write_keeps_resource_version(client: lightkube.AsyncClient) -> None:
    created = await client.create(make_pod("p", app="x"))
    same = await client.patch(
        Pod, "p", {"metadata": {"labels": {"app": "x"}}}, namespace="default", patch_type=PatchType.MERGE
    )
    assert same.metadata.resourceVersion == created.metadata.resourceVersion


async def test_graceful_delete_with_finalizers(client: lightkube.AsyncClient, api: LocalAPIServer) -> None:
    pod = make_pod("f")
    pod.metadata.finalizers = ["example.com/hold"]
    await client.create(pod)
    await client.delete(Pod, "f", namespace="default")
    marked = await client.get(Pod, "f", namespace="default")
    assert marked.metadata.deletionTimestamp is not None
    await client.delete(Pod, "f", namespace="default")  # deleting again changes nothing
    assert (
        await client.get(Pod, "f", namespace="default")
    ).metadata.resourceVersion == marked.metadata.resourceVersion
    await client.patch(
        Pod, "f", {"metadata": {"finalizers": None}}, namespace="default", patch_type=PatchType.MERGE
    )
    with pytest.raises(lightkube.ApiError) as exc:
        await client.get(Pod, "f", namespace="default")
    assert exc.value.status.code == 404
    await client.create(make_pod("plain"))
    await client.delete(Pod, "plain", namespace="default")
    assert api.store.objects(PODS) == []


async def test_delete_preconditions_and_collection(raw: Raw, client: lightkube.AsyncClient) -> None:
    await client.create(make_pod("a", app="x"))
    await client.create(make_pod("b", app="x"))
    await client.create(make_pod("c", app="y"))
    status, body, _ = await raw.request(
        "DELETE", "/api/v1/namespaces/default/pods/a", {"preconditions": {"resourceVersion": "1"}}
    )
    assert (status, body["reason"]) == (409, "Conflict")
    status, body, _ = await raw.request("DELETE", "/api/v1/namespaces/default/pods", labelSelector="app=x")
    assert status == 200
    assert sorted(i["metadata"]["name"] for i in body["items"]) == ["a", "b"]
    assert [p.metadata.name async for p in client.list(Pod, namespace="default")] == ["c"]


async def test_cluster_scoped_and_events(client: lightkube.AsyncClient) -> None:
    node = await client.create(Node(metadata=ObjectMeta(name="n1", labels={"role": "worker"})))
    assert node.metadata.namespace is None
    assert [n.metadata.name async for n in client.list(Node, labels={"role": "worker"})] == ["n1"]
    ev = EventV1.from_dict(
        {
            "metadata": {"name": "e1", "namespace": "default"},
            "eventTime": "2024-01-01T00:00:00.000000Z",
            "reason": "Captured",
            "action": "Install",
            "reportingController": "x",
            "reportingInstance": "y",
            "type": "Normal",
        }
    )
    created = await client.create(ev)
    assert created.reason == "Captured"
    assert [e.metadata.name async for e in client.list(EventV1, namespace="default")] == ["e1"]


def test_sync_client_against_threaded_server(threaded: ThreadedServer) -> None:
    c = lightkube.Client(config=lightkube.KubeConfig.from_file(threaded.kubeconfig_path))
    try:
        c.create(make_pod("s"))
        assert [p.metadata.name for p in c.list(Pod, namespace="default")] == ["s"]
    finally:
        c.close()
    assert threaded.requests.count(verb="create", resource="pods") == 1
    assert threaded.requests.count(verb="list", resource="pods") == 1


def test_store_writes_from_another_thread_reach_watchers(threaded: ThreadedServer) -> None:
    c = lightkube.Client(config=lightkube.KubeConfig.from_file(threaded.kubeconfig_path))
    rv = str(threaded.store.resource_version)
    timer = threading.Timer(0.2, threaded.store.seed, args=(PODS, [pod_manifest("from-thread")]))
    timer.start()
    try:
        kind, obj = next(iter(c.watch(Pod, namespace="default", resource_version=rv)))
    finally:
        timer.cancel()
        c.close()
    assert (kind, obj.metadata.name) == ("ADDED", "from-thread")
    assert threaded.store.objects(PODS)[0]["metadata"]["resourceVersion"] == obj.metadata.resourceVersion
