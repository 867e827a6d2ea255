"""Prometheus metrics and the small HTTP endpoint serving /metrics, /healthz and /readyz.

The endpoint is a few lines on asyncio's own server rather than aiohttp: it answers three GETs, and the
controller's memory budget is better spent elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)
DISTRIBUTION = "istio-pod-network-controller"
FAILURE_REASONS = ("invalid_config", "netns_not_found", "apply_error", "patch_error", "internal")
"""Every `reason` of pods_failed_total, exported at 0 from the start: a counter series that appears at 1
has no increase() in Prometheus, so a controller's first failure would otherwise never alert."""
STAGES = ("discover", "verify", "apply", "patch")
"""Every `stage` of stage_seconds, exported from the start for the same reason."""
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ns = "istio_pod_network_controller"
        self.initialized = Counter(
            f"{ns}_pods_initialized", "Pods given capture rules and marked", registry=r
        )
        self.failed = Counter(
            f"{ns}_pods_failed", "Pod reconcile failures, by reason", ["reason"], registry=r
        )
        self.repaired = Counter(
            f"{ns}_pods_repaired", "Marked pods whose rules were missing or drifted", registry=r
        )
        self.reconfigured = Counter(
            f"{ns}_pods_reconfigured", "Pods re-applied after a spec change", registry=r
        )
        self.reinitialized = Counter(
            f"{ns}_pods_reinitialized",
            "Marked pods whose sandbox was recreated (new netns): rules applied to the new sandbox",
            registry=r,
        )
        self.foreign_netns = Counter(
            f"{ns}_pods_foreign_netns",
            "Pods found with processes in a network namespace other than their sandbox's (once per pod)",
            registry=r,
        )
        self.skipped = Counter(
            f"{ns}_pods_skipped", "Pod evaluations not selected, by reason", ["reason"], registry=r
        )
        self.stage_seconds = Histogram(
            f"{ns}_stage_seconds", "Duration of one reconcile stage", ["stage"], buckets=_BUCKETS, registry=r
        )
        for reason in FAILURE_REASONS:
            self.failed.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        self.end_to_end_seconds = Histogram(
            f"{ns}_pod_initialization_seconds",
            "From the pod first seen to the pod marked initialized",
            buckets=_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(f"{ns}_queue_depth", "Pod UIDs waiting in the work queue", registry=r)
        self.watch_restarts = Counter(
            f"{ns}_watch_restarts",
            "Watch streams restarted, by resource and cause",
            ["resource", "reason"],
            registry=r,
        )
        self.relists = Counter(
            f"{ns}_relists", "Full lists (initial and after 410 Gone)", ["resource"], registry=r
        )
        self.api_errors = Counter(
            f"{ns}_api_errors", "Failed API requests by HTTP code (0: no response)", ["code"], registry=r
        )
        self.informer_failures = Counter(
            f"{ns}_informer_failures",
            "Failed lists/watches by resource and reason: unreachable, http_<code>, bad_response, internal",
            ["resource", "reason"],
            registry=r,
        )
        self.foreign_objects = Counter(
            f"{ns}_foreign_objects",
            "Objects the server sent outside the requested selector (another node's pods), dropped",
            ["resource"],
            registry=r,
        )
        self.pods_cached = Gauge(f"{ns}_pods_cached", "Pods on this node in the local cache", registry=r)
        self.node_netns_rules = Counter(
            f"{ns}_node_netns_rules_found",
            "Checks that found (and removed) our capture rules in the node's own network namespace",
            registry=r,
        )
        self.node_netns_clean = Gauge(
            f"{ns}_node_netns_clean",
            "1 when the last check found none of our rules in the node's own network namespace",
            registry=r,
        )
        self.ready = Gauge(f"{ns}_ready", "1 once the initial sync is done", registry=r)
        self.build = Info(f"{ns}_build", "The running controller's version", registry=r)
        self.build.info({"version": _version()})

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _probe(ok: bool, failure: bytes) -> tuple[str, str, bytes]:
    return ("200 OK", "text/plain", b"ok\n") if ok else ("503 Service Unavailable", "text/plain", failure)


class StatusServer:
    """GET /metrics, /healthz, /readyz; anything else is 404. One request per connection."""

    def __init__(
        self,
        metrics: Metrics,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        not_ready: Callable[[], str] = lambda: "syncing",
    ) -> None:
        self._metrics = metrics
        self._healthy = healthy
        self._ready = ready
        self._not_ready = not_ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _answer(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
        if path == "/healthz":
            return _probe(self._healthy(), b"stalled\n")
        if path == "/readyz":
            return _probe(self._ready(), self._not_ready().encode("utf-8", "replace") + b"\n")
        return "404 Not Found", "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            else:
                status, ctype, body = self._answer(path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method == "GET" else b""))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
