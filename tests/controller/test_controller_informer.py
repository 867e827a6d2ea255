"""The list-then-watch loop against the in-process API emulator: RV handling, 410 relist diff, faults, and a
restarting, broken or hostile API server (garbage bodies, instant-close watches, ignored selectors)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ipnc_lab.localapi import PODS, Hostile, LocalAPIServer
from istio_pod_network_controller.controller.cache import PodCache
from istio_pod_network_controller.controller.config import WatchTuning
from istio_pod_network_controller.controller.kube import ApiStatusError, Informer, KubeClient, load_config
from istio_pod_network_controller.controller.metrics import Metrics

NODE = "n1"


def pod(name: str, node: str = NODE) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default"}, "spec": {"nodeName": node, "containers": []}}


class Harness:
    """One pod informer for node n1, wired as the controller wires it (required fields, node filter)."""

    def __init__(self, api: LocalAPIServer, tuning: WatchTuning) -> None:
        self.api = api
        self.metrics = Metrics()
        self.client = KubeClient(load_config(str(api.kubeconfig_path)), self.metrics)
        self.cache = PodCache()
        self.deleted: list[str] = []
        self.events: list[tuple[str, str]] = []
        selector = {"fieldSelector": f"spec.nodeName={NODE}"}
        self.informer = Informer("pods", self.client, "/api/v1/pods", selector,
                                 self.listed, self.event, self.metrics, tuning,
                                 required=("name", "namespace", "uid", "resourceVersion"),
                                 accept=lambda p: p["spec"]["nodeName"] == NODE)  # fmt: skip

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


async def test_silent_stream_is_restarted_by_the_watchdog(api: LocalAPIServer) -> None:
    """A stream that sent a bookmark and then nothing (a half-open connection) is restarted."""
    api.faults.set_hostile(Hostile(stall=True))
    h = Harness(api, WatchTuning(timeout=300, inactivity=0.3))
    task = await running(h)
    try:
        await until(lambda: h.metric("watch_restarts_total", resource="pods", reason="inactivity") >= 2)
        api.faults.set_hostile(Hostile())
        api.store.seed(PODS, [pod("late")])
        await until(lambda: "late" in h.names())
    finally:
        await stop(task, h)


async def test_without_bookmarks_a_quiet_watch_lives_its_whole_timeout() -> None:
    """--watch-cache=false: silence is normal, the watchdog waits for the requested timeout."""
    async with LocalAPIServer(bookmark_interval=0.1) as api:
        api.faults.set_bookmarks(False)
        h = Harness(api, WatchTuning(timeout=2, jitter=0, inactivity=0.3))
        task = await running(h)
        try:
            await until(lambda: api.requests.count(verb="watch", resource="pods") >= 2)
            first, second = (r for r in api.requests.records() if r.verb == "watch")
            assert second.time - first.time >= 2  # the server's timeout ended it, not the 0.3 s watchdog
            assert h.metric("watch_restarts_total", resource="pods", reason="inactivity") == 0
            assert h.metric("watch_restarts_total", resource="pods", reason="closed") >= 1
        finally:
            await stop(task, h)


@pytest.mark.parametrize("kind", ["BOOKMARK", "MODIFIED"])
async def test_a_watch_that_closes_after_one_event_is_not_reopened_in_a_hot_loop(
    api: LocalAPIServer, kind: str
) -> None:
    api.store.seed(PODS, [pod("a")])
    h = Harness(api, WatchTuning(timeout=30))
    task = await running(h)
    try:
        api.faults.set_hostile(Hostile(instant_close=kind))
        api.faults.drop_watches()
        await until(lambda: api.requests.count(verb="watch", resource="pods") >= 3)
        started, before = time.monotonic(), api.requests.count(verb="watch", resource="pods")
        await asyncio.sleep(3)
        reopened = api.requests.count(verb="watch", resource="pods") - before
        elapsed = time.monotonic() - started
        # The churn backoff doubles from 0.2 s: a handful in 3 s, where resetting on the event gave ~19/s.
        assert reopened <= 8, f"{reopened} watches in {elapsed:.1f}s"
        api.faults.set_hostile(Hostile())
        api.store.seed(PODS, [pod("b")])
        await until(lambda: "b" in h.names(), 40)  # the churn backoff never exceeds its 30 s cap
    finally:
        await stop(task, h)


async def test_an_accepted_watch_resets_the_backoff(api: LocalAPIServer) -> None:
    """Six 500s grow the backoff to seconds; the watch the server then accepts brings it back down."""
    h = Harness(api, WatchTuning(timeout=30))
    task = await running(h)
    try:
        api.faults.fail_next(6, status=500, verb="watch", resource="pods")
        api.faults.drop_watches()
        await until(lambda: h.metric("api_errors_total", code="500") == 6, 60)
        await until(lambda: api.store.watcher_count() == 1 and h.informer.failing is None, 30)
        api.faults.fail_next(1, status=500, verb="watch", resource="pods")
        api.faults.drop_watches()
        dropped = time.time()
        await until(lambda: api.store.watcher_count() == 1 and h.metric("api_errors_total", code="500") == 7)
        watch = [r for r in api.requests.records() if r.verb == "watch" and r.status == 200][-1]
        # With the grown backoff kept, the next attempt would come 6.4-12.8 s after the 500.
        assert watch.time - dropped < 3.2
    finally:
        await stop(task, h)


async def test_after_an_outage_with_an_rbac_window_and_410_the_informer_is_back_at_once(
    api: LocalAPIServer, tmp_path: object
) -> None:
    """A restart: 2 s refused, 1 s of 403s, then 410 for the old RV. A pod created during the outage is in
    the cache soon after the server authorizes again (the controller test pins the mark; the bench the
    figure); 403s in the window are retried at the probe rate, not backed off."""
    h = Harness(api, WatchTuning(timeout=30, relist_jitter=2.0))
    reader = api.add_user("ctl", "t-ctl", [{"verbs": ["list", "watch"], "resources": ["pods"]}])
    await h.client.close()
    h.client = KubeClient(load_config(str(api.write_kubeconfig(api.kubeconfig_path.parent / "ctl", reader))),
                          h.metrics)  # fmt: skip
    h.informer.client = h.client
    task = await running(h)
    try:
        restart = api.faults.restart(down=2.0, rbac_delay=1.0)
        await asyncio.sleep(0.5)
        api.store.seed(PODS, [pod("new")])
        await until(lambda: "new" in h.names(), 15)
        seen = time.time()
        assert restart.rbac_ready is not None and seen > restart.rbac_ready
        assert seen - restart.rbac_ready < 2.0, f"{seen - restart.rbac_ready:.2f}s after RBAC was ready"
        forbidden = [r for r in api.requests.records() if r.status == 403]
        assert forbidden and all(restart.rbac_ready - 1.0 <= r.time < restart.rbac_ready for r in forbidden)
        assert h.metric("informer_failures_total", resource="pods", reason="unreachable") >= 1
        assert h.metric("relists_total", resource="pods") == 2  # the resume was refused with 410
        assert h.informer.failing is None
    finally:
        await stop(task, h)


async def test_restart_after_restart_does_not_grow_the_backoff(api: LocalAPIServer) -> None:
    """Streams a restart cuts short are the outage's doing, not churn: the eighth recovery is as quick.
    (Each outage outlasts the first re-watch, so the client sees it, as it sees a real restart.)"""
    h = Harness(api, WatchTuning(timeout=30, relist_jitter=2.0))
    task = await running(h)
    try:
        for i in range(8):
            restart = api.faults.restart(down=1.0)
            await asyncio.sleep(0.1)
            api.store.seed(PODS, [pod(f"p{i}")])
            await until(lambda i=i: f"p{i}" in h.names(), 40)
            assert restart.listening is not None
            late = time.time() - restart.listening
            assert late < 2.0, f"restart {i}: seen {late:.2f}s after the server listened again"
    finally:
        await stop(task, h)


GARBAGE_LISTS = [b"[]", b'{"metadata": {"resourceVersion": "9"}, "items": [1, "x"]}', b"null", b"{"]
GARBAGE_LINES = [b"null", b'{"object":"x"}', b'{"type":"ADDED","object":{"metadata":{"name":"x"}}}', b"}{"]


@pytest.mark.parametrize(
    ("body", "lines"), [(b, None) for b in GARBAGE_LISTS] + [(None, (line,)) for line in GARBAGE_LINES]
)
async def test_garbage_is_logged_counted_retried_and_reported(
    api: LocalAPIServer, caplog: pytest.LogCaptureFixture, body: bytes | None, lines: tuple[bytes, ...] | None
) -> None:
    api.store.seed(PODS, [pod("a")])
    h = Harness(api, WatchTuning(timeout=30))
    task = await running(h)
    caplog.set_level(logging.WARNING, "istio_pod_network_controller.controller.kube")
    try:
        api.faults.set_hostile(Hostile(list_body=body, watch_lines=lines))
        api.faults.restart()  # the next watch is 410: a relist, or a watch, meets the garbage
        await until(lambda: h.metric("informer_failures_total", resource="pods", reason="bad_response") >= 2)
        assert h.informer.failing is not None and h.informer.failing.startswith("bad_response")
        assert not task.done()
        assert any("bad_response" in r.getMessage() for r in caplog.records)
        assert h.names() == {"a"}  # nothing half-applied
        api.faults.set_hostile(Hostile())
        api.store.seed(PODS, [pod("b")])
        await until(lambda: h.names() == {"a", "b"}, 40)
        await until(lambda: h.informer.failing is None, 15)
    finally:
        await stop(task, h)


async def test_a_server_ignoring_the_field_selector_cannot_hand_over_other_nodes_pods(
    api: LocalAPIServer,
) -> None:
    api.faults.set_hostile(Hostile(ignore_selectors=True))
    api.store.seed(PODS, [pod("mine"), pod("theirs", node="n2")])
    h = Harness(api, WatchTuning(timeout=30))
    task = await running(h)
    try:
        api.store.seed(PODS, [pod("mine2"), pod("theirs2", node="n2")])
        await until(lambda: "mine2" in h.names())
        await until(lambda: h.metric("foreign_objects_total", resource="pods") == 2)
        api.store.delete(PODS, "default", "theirs")
        await until(lambda: h.metric("foreign_objects_total", resource="pods") == 3)
        assert h.names() == {"mine", "mine2"}
        assert {name for _, name in h.events} == {"mine2"}
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
