"""Issue 21 item 7, below `run`: every API body goes through the wire layer. A `{}` or an HTML page
answering a pod patch, an Event or a SelfSubjectAccessReview is a named error, never a decode error out of
a library; watch lines and bodies are bounded while they are read."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from test_controller_informer import Harness, pod, running, stop, until

from ipnc_lab.localapi import PODS, Hostile, LocalAPIServer
from istio_pod_network_controller.controller import wire
from istio_pod_network_controller.controller.access import probe_access
from istio_pod_network_controller.controller.config import WatchTuning
from istio_pod_network_controller.controller.kube import ApiStatusError, KubeClient, load_config
from istio_pod_network_controller.controller.metrics import Metrics
from istio_pod_network_controller.controller.preflight import Access, decide_access, node_event

HTML = b"<html><head><title>502 Bad Gateway</title></head><body>\xff\x00 nginx</body></html>"
ANSWERS = {"empty object": b"{}", "HTML page": HTML, "JSON list": b"[]", "nothing": b""}


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
async def test_lines_are_split_the_same_however_the_stream_is_chunked(size: int) -> None:
    stream = b'{"a":1}\n\n{"b":2}\n' + b"x" * 10 + b"\n" + b"tail"
    lines = [line async for line in wire.bounded_lines(chunks_of(stream, size), limit=10)]
    assert lines == [b'{"a":1}', b"", b'{"b":2}', b"x" * 10, b"tail"]


async def test_a_line_over_the_limit_stops_the_reading_at_once() -> None:
    read = 0

    async def endless() -> AsyncIterator[bytes]:  # a line that never ends
        nonlocal read
        while True:
            read += 1 << 16
            yield b"a" * (1 << 16)

    with pytest.raises(wire.TooLarge, match="longer than 1048576 bytes"):
        async for _ in wire.bounded_lines(endless(), limit=1 << 20):
            pass
    assert read <= (1 << 20) + (1 << 16)  # nothing past the limit's chunk was read
    with pytest.raises(wire.TooLarge, match="list body is longer"):
        await wire.bounded_body(chunks_of(b"b" * 100, 7), "list body", limit=99)
    assert await wire.bounded_body(chunks_of(b"b" * 99, 7), "list body", limit=99) == b"b" * 99


@pytest.mark.parametrize("raw", ANSWERS.values(), ids=ANSWERS.keys())
def test_answers_that_are_not_objects_are_named_errors(raw: bytes) -> None:
    with pytest.raises(wire.BadResponse) as refused:
        wire.parse_access_review(raw)
    assert "SelfSubjectAccessReview answer" in str(refused.value)
    with pytest.raises(wire.BadResponse) as refused:
        wire.parse_written(raw, "pod patch answer")
    assert str(refused.value).startswith("pod patch answer") and "\xff" not in str(refused.value)
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(wire.BadResponse, match="nested too deeply"):
        wire.parse_written(deep, "pod patch answer")


def test_json_that_would_cost_too_many_objects_is_refused_before_parsing() -> None:
    nested = b"[" + b"{}," * wire.MAX_OBJECT_VALUES + b"{}]"  # a 0.7 MiB line: far under the byte limit
    with pytest.raises(wire.TooLarge, match="watch line holds more than 250000 JSON values"):
        wire.parse_event(b'{"type":"ADDED","object":{"metadata":{"name":"a"},"x":' + nested + b"}}")
    with pytest.raises(wire.TooLarge, match="pod patch answer holds more"):
        wire.parse_written(b'{"metadata":{},"x":' + nested + b"}", "pod patch answer")
    items = b",".join(
        [b'{"metadata":{"name":"p","uid":"u","resourceVersion":"1"},"x":' + nested[:300_000] + b"]}"] * 10
    )
    with pytest.raises(wire.TooLarge, match="list body holds more than 1000000"):
        wire.parse_list(b'{"metadata":{"resourceVersion":"1"},"items":[' + items + b"]}")


@pytest.fixture
async def api() -> AsyncIterator[LocalAPIServer]:
    async with LocalAPIServer(bookmark_interval=0.2, history_size=100) as server:
        yield server


@pytest.mark.parametrize("raw", [b"{}", HTML], ids=["empty object", "HTML page"])
async def test_bad_answers_to_writes_and_access_reviews(api: LocalAPIServer, raw: bytes) -> None:
    api.store.seed(PODS, [pod("a")])
    config = load_config(str(api.kubeconfig_path))
    client = KubeClient(config, Metrics())
    api.faults.set_hostile(
        Hostile(write_body=raw, write_type="text/html" if raw == HTML else "application/json")
    )
    try:
        with pytest.raises(ApiStatusError) as refused:
            await client.patch_pod_annotations("default", "a", {"k": "v"})
        assert (refused.value.code, refused.value.reason) == (200, "BadResponse")
        assert "pod patch answer" in str(refused.value)
        with pytest.raises(ApiStatusError) as refused:
            await client.create_event(node_event("n1", "a message"), attempts=1)
        assert (refused.value.code, refused.value.reason) == (201, "BadResponse")
        answers, problem = await probe_access(config, [Access("", "pods", "list")])
        assert answers == [] and problem is not None and problem.code == 201
        assert "not a SelfSubjectAccessReview" in problem.message
        check = decide_access("https://api", answers, problem)
        assert not check.ok and "answered 201" in check.reason()
    finally:
        await client.close()
    api.faults.set_hostile(Hostile())
    answers, problem = await probe_access(config, [Access("", "pods", "list")])
    assert problem is None and len(answers) == 1


async def test_a_huge_watch_line_is_cut_off_and_relisted(
    api: LocalAPIServer, caplog: pytest.LogCaptureFixture
) -> None:
    api.store.seed(PODS, [pod("a")])
    h = Harness(api, WatchTuning(timeout=30))
    task = await running(h)
    caplog.set_level(logging.WARNING, "istio_pod_network_controller.controller.kube")
    try:
        relists = h.metric("relists_total", resource="pods")
        api.faults.set_hostile(Hostile(huge_line=64 << 20))
        api.faults.drop_watches()  # the next watch meets the line
        await until(lambda: h.metric("informer_failures_total", resource="pods", reason="too_large") >= 2, 30)
        assert h.metric("relists_total", resource="pods") >= relists + 1  # from a list again
        assert not task.done() and h.names() == {"a"}
        logged = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
        assert len(logged) == 1, logged  # once for the whole streak
        api.faults.set_hostile(Hostile())
        api.store.seed(PODS, [pod("b")])
        await until(lambda: h.names() == {"a", "b"}, 40)
        await until(lambda: h.informer.failing is None, 15)
    finally:
        await stop(task, h)
