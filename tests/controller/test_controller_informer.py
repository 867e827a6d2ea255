"""The list-then-watch loop against the in-process API emulator: RV handling, 410 relist diff, faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ipnc_lab.localapi import PODS, LocalAPIServer
from istio_pod_network_controller.controller.cache import PodCache
from istio_pod_network_controller.controller.config import WatchTuning
from istio_pod_network_controller.controller.kube import ApiStatusError, Informer, KubeClient, load_config
from istio_pod_network_controller.controller.metrics import Metrics

NODE = "n1"


def pod(name: str, node: str = NODE) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default"}, "spec": {"nodeName": node, "containers": []}}


class Harness:
    def __init__(self, api: LocalAPIServer, tuning: WatchTuning) -> None:
        self.api = api
        self.metrics = Metrics()
        self.client = KubeClient(load_config(str(api.kubeconfig_path)), self.metrics)
        self.cache = PodCache()
        self.deleted: list[str] = []
        self.events: list[tuple[str, str]] = []
        selector = {"fieldSelector": f"spec.nodeName={NODE}"}
        self.informer = Informer("pods", self.client, "/api/v1/pods", selector,
                                 self.listed, self.event, self.metrics, tuning)  # fmt: skip

    def listed(self, items: list[dict[str, Any]]) -> None:
        _, gone = self.cache.replace(items)
        self.deleted += [g["metadata"]["name"] for g in gone]

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((kind, obj["metadata"]["name"]))
        if kind == "DELETED":
            self.cache.remove(obj)
            self.deleted.append(obj["metadata"]["name"])
        else:
            self.cache.upsert(obj)

    def names(self) -> set[str]:
        return {p["metadata"]["name"] for p in self.cache.objects.values()}

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"istio_pod_network_controller_{name}", labels)
        return value or 0.0


async def until(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def api() -> AsyncIterator[LocalAPIServer]:
    async with LocalAPIServer(bookmark_interval=0.2, history_size=100) as server:
        yield server


async def running(h: Harness) -> asyncio.Task[None]:
    task = asyncio.create_task(h.informer.run())
    await asyncio.wait_for(h.informer.synced.wait(), 5)
    return task


async def stop(task: asyncio.Task[None], h: Harness) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await h.client.close()


async def test_list_then_watch_from_the_list_rv_with_bookmarks(api: LocalAPIServer) -> None:
    api.store.seed(PODS, [pod("a"), pod("other", node="n2")])
    h = Harness(api, WatchTuning(timeout=30))
    task = await running(h)
    try:
        assert h.names() == {"a"}
        list_rv = h.informer.resource_version
        api.store.seed(PODS, [pod("b"), pod("c", node="n2")])
        await until(lambda: h.names() == {"a", "b"})
        watch = next(r for r in api.requests.records() if r.verb == "watch")
        assert watch.query["resourceVersion"] == list_rv
        assert watch.query["allowWatchBookmarks"] == "true"
        assert watch.query["fieldSelector"] == f"spec.nodeName={NODE}"
        assert 24 <= int(watch.query["timeoutSeconds"]) <= 36
        before = h.informer.resource_version
        api.store.seed(PODS, [pod("elsewhere", node="n3")])  # moves the RV without an event for us
        await until(lambda: h.informer.resource_version != before, 3)  # a BOOKMARK carried the new RV
        assert ("ADDED", "elsewhere") not in h.events
        assert api.requests.count(verb="list", resource="pods") == 1
    finally:
        await stop(task, h)


async def test_410_relists_and_synthesises_deletions(api: LocalAPIServer) -> None:
    api.store.seed(PODS, [pod("a"), pod("b")])
    h = Harness(api, WatchTuning(timeout=30, relist_jitter=0.05))
    task = await running(h)
    try:
        api.faults.pause()  # the re-watch hangs: changes happen while we are not watching
        api.faults.restart()  # watches end and every RV so far is compacted away
        await asyncio.sleep(0.05)
        api.store.delete(PODS, "default", "a")
        api.store.seed(PODS, [pod("c")])
        api.faults.resume()
        await until(lambda: h.names() == {"b", "c"})
        assert "a" in h.deleted
        assert h.metric("relists_total", resource="pods") == 2
        assert h.metric("watch_restarts_total", resource="pods", reason="expired") >= 1
        api.store.seed(PODS, [pod("d")])  # and the new watch is live
        await until(lambda: "d" in h.names())
    finally:
        await stop(task, h)


async def test_dropped_watches_resume_from_last_rv_without_relist(api: LocalAPIServer) -> None:
    h = Harness(api, WatchTuning(timeout=30))
    task = await running(h)
    try:
        for i in range(3):
            await until(lambda: api.store.watcher_count() == 1)
            api.faults.drop_watches()
            api.store.seed(PODS, [pod(f"p{i}")])
            await until(lambda i=i: f"p{i}" in h.names())
        assert api.requests.count(verb="list", resource="pods") == 1
        await until(lambda: h.metric("watch_restarts_total", resource="pods", reason="closed") >= 3)
    finally:
        await stop(task, h)


async def test_429_and_500_bursts_back_off_and_recover(api: LocalAPIServer) -> None:
    api.faults.fail_next(2, status=429, verb="list", resource="pods", retry_after=1)
    api.faults.fail_next(3, status=500, verb="watch", resource="pods")
    api.store.seed(PODS, [pod("a")])
    h = Harness(api, WatchTuning(timeout=30))
    started = time.monotonic()
    task = await running(h)
    try:
        assert time.monotonic() - started >= 2.0  # Retry-After: 1, twice
        api.store.seed(PODS, [pod("b")])
        await until(lambda: h.names() == {"a", "b"}, 10)
        assert h.metric("api_errors_total", code="429") == 2
        assert h.metric("api_errors_total", code="500") == 3
    finally:
        await stop(task, h)


async def test_silent_stream_is_restarted_by_the_watchdog() -> None:
    async with LocalAPIServer(bookmark_interval=3600) as api:
        h = Harness(api, WatchTuning(timeout=300, inactivity=0.3))
        task = await running(h)
        try:
            await until(lambda: h.metric("watch_restarts_total", resource="pods", reason="inactivity") >= 2)
            api.store.seed(PODS, [pod("late")])
            await until(lambda: "late" in h.names())
        finally:
            await stop(task, h)


async def test_connection_refused_is_retried() -> None:
    async with LocalAPIServer() as api:
        config = load_config(str(api.kubeconfig_path))
    metrics = Metrics()
    client = KubeClient(config, metrics)
    try:
        with pytest.raises(ApiStatusError) as err:
            await client.list("/api/v1/pods", {})
        assert err.value.code == 0
    finally:
        await client.close()
