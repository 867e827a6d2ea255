"""The work queue, backoff, Event dedupe, caches and config parsing: no root, no network."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from istio_pod_network_controller.controller import config as cfg
from istio_pod_network_controller.controller import events as ev
from istio_pod_network_controller.controller.backoff import Backoff, jittered
from istio_pod_network_controller.controller.cache import PodCache, pod_ips, slim_pod
from istio_pod_network_controller.controller.decision import candidate_digests
from istio_pod_network_controller.controller.queue import QueueShutDown, WorkQueue
from istio_pod_network_controller.controller.view import PodView
from istio_pod_network_controller.errors import SpecError
from istio_pod_network_controller.settings.spec import Given, InterceptSpec, IPv6Policy


async def test_queue_coalesces_and_never_hands_a_key_out_twice() -> None:
    q = WorkQueue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2
    key, _ = await q.get()
    assert key == "a"
    q.add("a")  # an event while "a" is being processed
    assert len(q) == 1  # only "b" is ready: "a" waits until done()
    q.done("a")
    assert [await q.get() for _ in range(2)] == [("b", frozenset()), ("a", frozenset())]


async def test_queue_flags_merge() -> None:
    q = WorkQueue()
    q.add("a", "verify")
    q.add("a")
    assert await q.get() == ("a", frozenset({"verify"}))
    q.done("a")
    q.add("a")
    assert await q.get() == ("a", frozenset())


async def test_queue_delayed_add_and_event_makes_it_immediate() -> None:
    q = WorkQueue()
    q.add_after("a", 0.05)
    assert q.scheduled("a") and len(q) == 0
    assert await asyncio.wait_for(q.get(), 1) == ("a", frozenset())
    q.done("a")
    q.add_after("a", 30)
    q.add("a")  # the pod's next event: retry now
    assert not q.scheduled("a")
    assert await asyncio.wait_for(q.get(), 1) == ("a", frozenset())


async def test_queue_keeps_earliest_timer_and_forget_cancels() -> None:
    q = WorkQueue()
    q.add_after("a", 0.02)
    q.add_after("a", 30)
    assert await asyncio.wait_for(q.get(), 1) == ("a", frozenset())
    q.add_after("b", 0.01)
    q.forget("b")
    await asyncio.sleep(0.05)
    assert len(q) == 0 and q.depth == 0  # "a" is in processing, "b" was forgotten


async def test_queue_shutdown_releases_workers() -> None:
    q = WorkQueue()
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.shutdown()
    with pytest.raises(QueueShutDown):
        await waiter
    q.add("x")
    assert len(q) == 0


def test_backoff_grows_with_jitter_caps_and_honours_retry_after() -> None:
    b = Backoff(initial=1, maximum=8, rng=random.Random(1))
    delays = [b.next() for _ in range(6)]
    for n, delay in enumerate(delays):
        base = min(8, 2**n)
        assert base / 2 <= delay <= base
    assert b.next(retry_after=20) == 20
    b.reset()
    assert b.next() <= 1
    assert len({round(Backoff(rng=random.Random(s)).next(), 6) for s in range(10)}) > 1
    assert all(80 <= jittered(100, 0.2) <= 120 for _ in range(100))


def _pod(uid: str = "u1", rv: str = "1", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "d", "uid": uid, "resourceVersion": rv,
                         "managedFields": [{"big": "x" * 100}]},
            "spec": {"containers": [{"name": "a", "env": [{"name": "X"}]}],
                     "initContainers": [{"name": "w"}]},
            "status": {"phase": "Running", **status}}  # fmt: skip


async def test_event_recorder_dedupes_warnings_not_normals() -> None:
    sent: list[dict[str, Any]] = []

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    rec = ev.EventRecorder("node1", send)
    pod = PodView.of(slim_pod(_pod()))
    assert rec.record(pod, ev.WARNING, ev.INVALID_CONFIG, "bad a")
    assert not rec.record(pod, ev.WARNING, ev.INVALID_CONFIG, "bad a")
    assert rec.record(pod, ev.WARNING, ev.INVALID_CONFIG, "bad b")
    assert rec.record(pod, ev.NORMAL, ev.INITIALIZED, "ok")
    assert rec.record(pod, ev.NORMAL, ev.INITIALIZED, "ok")
    rec.forget("u1")
    assert rec.record(pod, ev.WARNING, ev.INVALID_CONFIG, "bad a")
    await rec.flush(1)
    assert [e["reason"] for e in sent].count(ev.INVALID_CONFIG) == 3
    event = sent[0]
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "name": "p", "namespace": "d",
                                       "uid": "u1", "resourceVersion": "1"}  # fmt: skip
    assert event["source"] == {"component": "istio-pod-network-controller", "host": "node1"}
    assert event["type"] == "Warning" and event["count"] == 1
    names = [e["metadata"]["name"] for e in sent]
    assert names[0] == names[-1]  # the same Warning has the same name: the API refuses a duplicate
    assert len(set(names)) == len(sent) - 1


async def test_event_recorder_survives_send_failures() -> None:
    async def send(event: dict[str, Any]) -> None:
        raise RuntimeError("api down")

    rec = ev.EventRecorder("n", send)
    rec.record(PodView.of(slim_pod(_pod())), ev.NORMAL, ev.INITIALIZED, "x")
    await rec.flush(1)


def test_cache_slims_and_relist_diffs() -> None:
    cache = PodCache()
    slim = slim_pod(_pod(podIP="10.0.0.1", podIPs=[{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                         containerStatuses=[{"containerID": "containerd://abc"}]))  # fmt: skip
    assert "managedFields" not in slim["metadata"] and "env" not in str(slim)
    assert pod_ips(slim) == ["10.0.0.1", "fd00::1"]
    assert slim["status"]["containerIDs"] == ["containerd://abc"]
    assert cache.upsert(_pod("u1")) == ("u1", True)
    assert cache.upsert(_pod("u1")) == ("u1", False)
    cache.upsert(_pod("u2"))
    changed, gone = cache.replace([_pod("u1", rv="5"), _pod("u3")])
    assert changed == ["u1", "u3"]
    assert [g["metadata"]["uid"] for g in gone] == ["u2"]
    assert sorted(cache.objects) == ["u1", "u3"]
    assert cache.in_namespace("d") == ["u1", "u3"]


def test_config_merges_legacy_flags_under_modern_ones_and_keeps_each_source() -> None:
    modern = Given("9000", "IPNC_EXCLUDE_INBOUND_PORTS")
    merged = cfg.spec_defaults(
        {"interception_mode": None, "exclude_inbound_ports": modern},
        {"--istio-inbound-interception-mode": "TPROXY", "--istio-exclude-inbound-ports": "1,2",
         "--istio-include-outbound-ip-ranges": None, "--istio-exclude-outbound-ip-ranges": None},
    )  # fmt: skip
    assert merged == {
        "interception_mode": Given("TPROXY", "--istio-inbound-interception-mode"),
        "exclude_inbound_ports": modern,
    }
    cfg.check_spec_defaults(merged)
    with pytest.raises(SpecError, match=r"^--istio-inbound-interception-mode: invalid value 'X'"):
        cfg.check_spec_defaults(cfg.spec_defaults({}, {"--istio-inbound-interception-mode": "X"}))
    with pytest.raises(SpecError, match=r"^IPNC_PROXY_UID: invalid value '0'"):
        cfg.check_spec_defaults({"proxy_uid": Given("0", "IPNC_PROXY_UID")})
    assert {cfg.legacy_param(f) for f in cfg.LEGACY_SPEC_FLAGS} == {
        "legacy_" + s for s in cfg.LEGACY_SPEC_FLAGS.values()
    }
    assert cfg.parse_listen("127.0.0.1:9102") == ("127.0.0.1", 9102)
    assert cfg.parse_listen("[::1]:80") == ("::1", 80)
    assert cfg.parse_listen(":9102") == ("0.0.0.0", 9102)
    with pytest.raises(cfg.ConfigError):
        cfg.parse_listen("nope")
    assert cfg.default_concurrency() >= 2


def test_candidate_digests_cover_ipv6_resolution() -> None:
    auto = InterceptSpec()
    assert candidate_digests(auto) == {
        auto.with_ipv6(True).fingerprint(),
        auto.with_ipv6(False).fingerprint(),
    }
    fixed = InterceptSpec(ipv6=IPv6Policy.BLOCK)
    assert candidate_digests(fixed) == {fixed.fingerprint()}


async def test_pod_logger_lines_carry_the_pod_and_events_share_the_sentence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json
    import logging

    from istio_pod_network_controller.controller.logs import JsonFormatter, PodLogger, TextFormatter

    sent: list[dict[str, Any]] = []

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    plog = PodLogger(
        logging.getLogger("ipnc.test"), PodView.of(slim_pod(_pod())), ev.EventRecorder("n", send)
    )
    with caplog.at_level(logging.DEBUG, logger="ipnc.test"):
        plog.info("initialized %s", "ok")
        plog.normal(ev.INITIALIZED, "capture rules installed")
        assert plog.warn_event(ev.INVALID_CONFIG, "bad value", detail="pid 42")
        assert not plog.warn_event(ev.INVALID_CONFIG, "bad value", detail="pid 42")  # deduped: no 2nd line
    await plog.recorder.flush(1)
    first = caplog.records[0]
    entry = json.loads(JsonFormatter().format(first))
    assert entry["msg"] == "initialized ok" and entry["namespace"] == "d" and entry["pod"] == "p"
    assert TextFormatter().format(first).endswith("namespace=d pod=p")
    assert [r.getMessage() for r in caplog.records[1:]] == [
        "Initialized: capture rules installed",
        "InvalidInterceptionConfig: bad value (pid 42)",
    ]
    assert [(e["reason"], e["message"]) for e in sent] == [
        (ev.INITIALIZED, "capture rules installed"),
        (ev.INVALID_CONFIG, "bad value"),  # the log's detail never reaches the Event
    ]
