"""Watch semantics: resume from an RV, 410 Expired, bookmarks, timeouts and selector transitions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import lightkube
import pytest
from lightkube.resources.core_v1 import Namespace, Pod
from lightkube.types import OnErrorAction, OnErrorResult, PatchType

from ipnc_lab.localapi import LocalAPIServer

from .conftest import Raw
from .test_lightkube import make_pod


async def collect(stream: Any, count: int, timeout: float = 5.0) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []

    async def run() -> None:
        async for event in stream:
            out.append(event)
            if len(out) >= count:
                return

    await asyncio.wait_for(run(), timeout)
    return out


def summary(events: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    return [(t, o.metadata.name) for t, o in events]


async def test_watch_resumes_from_list_resource_version(client: lightkube.AsyncClient) -> None:
    await client.create(make_pod("a"))
    listing = client.list(Pod, namespace="default")
    assert [p.metadata.name async for p in listing] == ["a"]
    rv = listing.resourceVersion
    await client.create(make_pod("b"))
    await client.patch(
        Pod, "a", {"metadata": {"labels": {"x": "1"}}}, namespace="default", patch_type=PatchType.MERGE
    )
    await client.delete(Pod, "b", namespace="default")
    events = await collect(client.watch(Pod, namespace="default", resource_version=rv), 3)
    assert summary(events) == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    versions = [int(o.metadata.resourceVersion) for _, o in events]
    assert versions == sorted(versions)
    assert versions[0] > int(rv)


async def test_watch_without_rv_starts_with_synthetic_added(client: lightkube.AsyncClient) -> None:
    await client.create(make_pod("old"))
    stream = client.watch(Pod, namespace="default")

    async def later() -> None:
        await asyncio.sleep(0.1)
        await client.create(make_pod("new"))

    task = asyncio.create_task(later())
    events = await collect(stream, 2)
    await task
    assert summary(events) == [("ADDED", "old"), ("ADDED", "new")]


async def test_watch_is_scoped_to_its_namespace(client: lightkube.AsyncClient, api: LocalAPIServer) -> None:
    await client.create(Namespace(metadata=lightkube.models.meta_v1.ObjectMeta(name="other")))
    rv = str(api.store.resource_version)
    await client.create(make_pod("elsewhere", namespace="other"))
    await client.create(make_pod("here"))
    events = await collect(client.watch(Pod, namespace="default", resource_version=rv), 1)
    assert summary(events) == [("ADDED", "here")]


async def fill_history(client: lightkube.AsyncClient, n: int) -> None:
    await client.create(make_pod("churn"))
    for i in range(n):
        await client.patch(
            Pod,
            "churn",
            {"metadata": {"labels": {"i": str(i)}}},
            namespace="default",
            patch_type=PatchType.MERGE,
        )


async def test_too_old_resource_version_is_410_expired(client: lightkube.AsyncClient, raw: Raw) -> None:
    await fill_history(client, 60)  # history_size is 50 in the fixture
    # On the wire: a 200 stream carrying one ERROR event with an Expired Status, then the end.
    events = await raw.watch_lines("/api/v1/namespaces/default/pods", count=10, resourceVersion="2")
    assert len(events) == 1
    assert events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"], status["status"]) == (
        "Status",
        410,
        "Expired",
        "Failure",
    )
    assert status["message"].startswith("too old resource version: 2 (")
    # lightkube turns the ERROR event into an ApiError raised from the iterator ...
    with pytest.raises(lightkube.ApiError) as exc:
        await collect(client.watch(Pod, namespace="default", resource_version="2"), 1)
    assert (exc.value.status.code, exc.value.status.reason) == (410, "Expired")
    # ... and with a RETRY handler it drops the RV and re-watches from "now" (synthetic ADDED).
    seen: list[int] = []

    def retry(e: Exception, count: int) -> OnErrorResult:
        seen.append(getattr(getattr(e, "status", None), "code", 0))
        return OnErrorResult(OnErrorAction.RETRY)

    events2 = await collect(client.watch(Pod, namespace="default", resource_version="2", on_error=retry), 1)
    assert seen == [410]
    assert summary(events2) == [("ADDED", "churn")]
    recent = str(raw.api.store.resource_version - 5)
    assert len(await collect(client.watch(Pod, namespace="default", resource_version=recent), 5)) == 5


async def test_bookmarks_carry_only_the_resource_version(raw: Raw, client: lightkube.AsyncClient) -> None:
    await client.create(make_pod("p"))
    rv = raw.api.store.resource_version
    events = await raw.watch_lines(
        "/api/v1/namespaces/default/pods", count=2, resourceVersion=str(rv), allowWatchBookmarks="true"
    )
    assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"]
    assert events[0]["object"] == {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": str(rv)},
    }
    # Without allowWatchBookmarks no bookmark is sent: the first line is the next real event.
    task = asyncio.create_task(
        raw.watch_lines("/api/v1/namespaces/default/pods", count=1, resourceVersion=str(rv))
    )
    await asyncio.sleep(0.5)  # longer than two bookmark intervals
    await client.create(make_pod("q"))
    (event,) = await task
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "q")


async def test_lightkube_does_not_request_bookmarks(
    client: lightkube.AsyncClient, api: LocalAPIServer
) -> None:
    await client.create(make_pod("p"))
    await collect(client.watch(Pod, namespace="default"), 1)
    (watch,) = [r for r in api.requests.records() if r.verb == "watch"]
    assert "allowWatchBookmarks" not in watch.query
    assert watch.status == 200


async def test_timeout_seconds_ends_the_stream_cleanly(raw: Raw) -> None:
    started = time.monotonic()
    async with raw.session.get(
        raw.api.url + "/api/v1/pods", params={"watch": "true", "timeoutSeconds": "1"}, headers=raw.headers
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert resp.headers["Content-Type"].startswith("application/json")
        body = await resp.read()  # raises if the stream is not terminated properly
    elapsed = time.monotonic() - started
    assert body == b""
    assert 0.9 <= elapsed < 3
    assert raw.api.store.watcher_count() == 0


async def test_label_selector_transitions_become_added_and_deleted(client: lightkube.AsyncClient) -> None:
    rv = None
    listing = client.list(Pod, namespace="default")
    _ = [p async for p in listing]
    rv = listing.resourceVersion
    await client.create(make_pod("p", app="web"))
    await client.patch(
        Pod, "p", {"metadata": {"labels": {"app": "db"}}}, namespace="default", patch_type=PatchType.MERGE
    )
    await client.create(make_pod("other", app="db"))
    await client.patch(
        Pod,
        "p",
        {"metadata": {"labels": {"app": "web", "v": "2"}}},
        namespace="default",
        patch_type=PatchType.MERGE,
    )
    await client.patch(
        Pod, "p", {"metadata": {"labels": {"v": "3"}}}, namespace="default", patch_type=PatchType.MERGE
    )
    events = await collect(
        client.watch(Pod, namespace="default", labels={"app": "web"}, resource_version=rv), 4
    )
    assert summary(events) == [("ADDED", "p"), ("DELETED", "p"), ("ADDED", "p"), ("MODIFIED", "p")]
    deleted = events[1][1]
    assert deleted.metadata.labels == {"app": "web"}  # the last state that matched ...
    assert int(deleted.metadata.resourceVersion) > int(
        events[0][1].metadata.resourceVersion
    )  # ... at the new RV


async def test_field_selector_transitions(client: lightkube.AsyncClient, api: LocalAPIServer) -> None:
    rv = str(api.store.resource_version)
    await client.create(make_pod("p"))
    await client.patch(
        Pod.Status, "p", {"status": {"phase": "Running"}}, namespace="default", patch_type=PatchType.MERGE
    )
    await client.create(make_pod("q"))
    events = await collect(
        client.watch(Pod, namespace="*", fields={"status.phase": "Pending"}, resource_version=rv), 3
    )
    assert summary(events) == [("ADDED", "p"), ("DELETED", "p"), ("ADDED", "q")]
    assert events[1][1].status.phase == "Pending"


async def test_dropped_watch_resumes_without_loss_or_duplicates(
    client: lightkube.AsyncClient, api: LocalAPIServer
) -> None:
    got: list[tuple[str, str]] = []
    got_rv_of_b: list[str] = []
    done = asyncio.Event()

    async def consume() -> None:
        async for kind, obj in client.watch(Pod, namespace="default"):
            got.append((kind, obj.metadata.name))
            if obj.metadata.name == "b":
                got_rv_of_b.append(obj.metadata.resourceVersion)
            if len(got) == 4:
                done.set()
                return

    task = asyncio.create_task(consume())
    try:
        await client.create(make_pod("a"))
        await client.create(make_pod("b"))
        while len(got) < 2:
            await asyncio.sleep(0.01)
        assert api.faults.drop_watches() == 1
        await client.create(make_pod("c"))  # happens while no watch is open, or just after re-watch
        await client.delete(Pod, "a", namespace="default")
        await asyncio.wait_for(done.wait(), 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert got == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c"), ("DELETED", "a")]
    watches = [r for r in api.requests.records() if r.verb == "watch"]
    assert len(watches) == 2
    # The second watch resumed from the last RV the first one delivered.
    assert watches[1].query["resourceVersion"] == got_rv_of_b[0]


async def test_restart_fault_expires_old_versions(client: lightkube.AsyncClient, api: LocalAPIServer) -> None:
    created = await client.create(make_pod("a"))
    api.faults.restart()
    with pytest.raises(lightkube.ApiError) as exc:
        await collect(
            client.watch(Pod, namespace="default", resource_version=created.metadata.resourceVersion), 1
        )
    assert exc.value.status.code == 410
    # RVs from after the restart resume normally.
    rv = str(api.store.resource_version)
    await client.create(make_pod("b"))
    assert summary(await collect(client.watch(Pod, namespace="default", resource_version=rv), 1)) == [
        ("ADDED", "b")
    ]


async def test_one_event_reaches_many_watchers(raw: Raw, client: lightkube.AsyncClient) -> None:
    rv = str(raw.api.store.resource_version)
    tasks = [
        asyncio.create_task(raw.watch_lines("/api/v1/pods", count=1, resourceVersion=rv)) for _ in range(20)
    ]
    while raw.api.store.watcher_count() < 20:
        await asyncio.sleep(0.01)
    await client.create(make_pod("p"))
    results = await asyncio.gather(*tasks)
    assert all(r[0]["type"] == "ADDED" and r[0]["object"]["metadata"]["name"] == "p" for r in results)


async def test_client_disconnect_unregisters_the_watcher(raw: Raw) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.get(raw.api.url + "/api/v1/pods", params={"watch": "1"}, headers=raw.headers)
        assert resp.status == 200
        assert raw.api.store.watcher_count() == 1
        resp.close()
    for _ in range(200):
        if raw.api.store.watcher_count() == 0:
            break
        await asyncio.sleep(0.01)
    assert raw.api.store.watcher_count() == 0


async def test_lightkube_reconnects_after_server_timeout(
    client: lightkube.AsyncClient, api: LocalAPIServer
) -> None:
    await client.create(make_pod("a"))
    stream = client.watch(Pod, namespace="default", server_timeout=1)

    async def later() -> None:
        while api.requests.count(verb="watch") < 2:  # wait for the reconnect after the clean end
            await asyncio.sleep(0.05)
        await client.create(make_pod("b"))

    task = asyncio.create_task(later())
    events = await collect(stream, 2, timeout=5)
    await task
    assert summary(events) == [("ADDED", "a"), ("ADDED", "b")]
    first, second = [r for r in api.requests.records() if r.verb == "watch"][:2]
    assert first.query["timeoutSeconds"] == "1"
    assert second.query["resourceVersion"] == events[0][1].metadata.resourceVersion
