"""The controller process: informers feed caches and the work queue, workers reconcile, a timer repairs.

Start-up lists namespaces and this node's pods and reconciles every pod once before /readyz turns green,
which covers pods created while the controller was down. SIGTERM stops the intake, lets in-flight pods
finish (bounded by the grace period) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from ..dataplane.netns import raise_open_files_limit
from ..settings import annotations as ann
from . import events as ev
from . import nodeguard
from .cache import NamespaceCache, Obj, PodCache, host_ips, pod_key
from .config import ControllerConfig
from .kube import Informer, KubeClient, load_config
from .metrics import Metrics, StatusServer
from .preflight import Report, node_event
from .queue import QueueShutDown, WorkQueue
from .reconcile import VERIFY, Reconciler

log = logging.getLogger(__name__)
HEARTBEAT = 1.0
STALL_LIMIT = 30.0
PREFLIGHT_RETRY = 30.0
NODE_GUARD_INTERVAL = 60.0
"""How often the node's namespace is checked for our rules when the repair pass is turned off."""
NODE_GUARD_SYNC_WAIT = 10.0
"""The start-up check waits this long for the pod list, whose host IPs identify the node's namespace."""
Preflight = Callable[[], Awaitable[Report]]


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        preflight: Preflight | None = None,
        preflight_retry: float = PREFLIGHT_RETRY,
    ) -> None:
        self.config = config
        self.preflight = preflight
        self.preflight_retry = preflight_retry
        self.not_ready = "syncing"
        self.metrics = Metrics()
        self.pods = PodCache()
        self.namespaces = NamespaceCache()
        self.queue = WorkQueue()
        self.executor = ThreadPoolExecutor(max_workers=config.concurrency + 1, thread_name_prefix="dataplane")
        self.kube = KubeClient(load_config(config.kubeconfig), self.metrics)
        self.recorder = ev.EventRecorder(config.node_name, self.kube.create_event)
        self.reconciler = Reconciler(
            config,
            self.pods,
            self.namespaces,
            self.kube,
            self.recorder,
            self.metrics,
            self.executor,
        )
        self.pod_informer = Informer(
            "pods",
            self.kube,
            "/api/v1/pods",
            {"fieldSelector": f"spec.nodeName={config.node_name}"},
            self._pods_listed,
            self._pod_event,
            self.metrics,
            config.watch,
            required=("name", "namespace", "uid", "resourceVersion"),
            accept=self._on_this_node,
        )
        self.ns_informer = Informer(
            "namespaces",
            self.kube,
            "/api/v1/namespaces",
            {},
            self._namespaces_listed,
            self._namespace_event,
            self.metrics,
            config.watch,
        )
        self.initial: set[str] | None = None
        self.retrying: set[str] = set()
        self.kube.health.on_recovery(self._retry_now)
        self.ready = False
        self.beat = time.monotonic()
        self.in_flight = 0
        self.last_progress = time.monotonic()
        self.node_alarm: str | None = None
        self.node_alarms = 0
        self.stopping = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []

    # -- cache feeds ---------------------------------------------------------------------------------------

    def _on_this_node(self, pod: Obj) -> bool:
        """The fieldSelector asks the server for this node's pods; a server that ignores it is not trusted."""
        return (pod.get("spec") or {}).get("nodeName") == self.config.node_name

    def _enqueue(
        self, uid: str, *flags: str, resource_version: str | None = None, relisted: bool = False
    ) -> None:
        self.reconciler.observe(uid, resource_version, relisted=relisted)
        self.queue.add(uid, *flags)

    def _pods_listed(self, items: list[Obj]) -> None:
        changed, gone = self.pods.replace(items)
        for pod in gone:
            self._pod_gone(pod_key(pod))
        if self.initial is None:
            self.initial = set(changed)
        for uid in changed:
            self._enqueue(uid, relisted=True)
        self.metrics.pods_cached.set(len(self.pods))
        log.info(
            "pods on node %s listed: %d (%d changed, %d gone)",
            self.config.node_name,
            len(self.pods),
            len(changed),
            len(gone),
        )

    def _pod_event(self, kind: str, pod: Obj) -> None:
        if kind == "DELETED":
            if self.pods.remove(pod) is not None:
                self._pod_gone(pod_key(pod))
        else:
            uid, changed = self.pods.upsert(pod)
            if changed:
                self._enqueue(uid, resource_version=pod["metadata"].get("resourceVersion"))
        self.metrics.pods_cached.set(len(self.pods))

    def _pod_gone(self, uid: str) -> None:
        self.retrying.discard(uid)
        self.queue.forget(uid)
        self.reconciler.forget(uid)
        if self.initial is not None:
            self.initial.discard(uid)

    def _namespaces_listed(self, items: list[Obj]) -> None:
        changed, gone = self.namespaces.replace(items)
        for name in changed + [ns["metadata"]["name"] for ns in gone]:
            self._namespace_changed(name)

    def _namespace_event(self, kind: str, ns: Obj) -> None:
        name = ns["metadata"]["name"]
        if kind == "DELETED":
            self.namespaces.remove(name)
        elif not self.namespaces.upsert(ns)[1]:
            return
        self._namespace_changed(name)

    def _namespace_changed(self, name: str) -> None:
        """A namespace's annotations can select its pods (2018 rule): look at them again."""
        for uid in self.pods.in_namespace(name):
            self._enqueue(uid)

    # -- work ----------------------------------------------------------------------------------------------

    def _retry_now(self) -> None:
        """The API answers again after an outage: pods waiting out a retry (a mark that failed meanwhile)
        go now, not when their grown per-pod backoff ends."""
        if self.retrying:
            log.info("API reachable again: retrying %d pods now", len(self.retrying))
        for uid in list(self.retrying):
            self.queue.add(uid)

    async def _worker(self) -> None:
        while True:
            try:
                uid, flags = await self.queue.get()
            except QueueShutDown:
                return
            self.in_flight += 1
            try:
                delay = (await self.reconciler.reconcile(uid, flags)).retry_after
            except Exception:
                log.exception("reconcile of pod %s failed", uid)
                self.metrics.failed.labels("internal").inc()
                delay = 5.0
            finally:
                self.in_flight -= 1
                self.last_progress = time.monotonic()
                self.queue.done(uid)
            if delay is not None:
                self.retrying.add(uid)
                self.queue.add_after(uid, delay)
            else:
                self.retrying.discard(uid)
            if self.initial is not None:
                self.initial.discard(uid)
            self.metrics.queue_depth.set(self.queue.depth)

    async def _repair_loop(self) -> None:
        """Verify every pod this node marked, every repair interval (jittered); drift is re-applied."""
        interval = self.config.repair_interval
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311
            marked = [
                uid
                for uid, pod in self.pods.objects.items()
                if (pod["metadata"].get("annotations") or {}).get(ann.STATUS) == ann.STATUS_INITIALIZED
                and self.reconciler.select(pod).selected
            ]
            log.debug("drift check of %d pods", len(marked))
            for uid in marked:
                self.queue.add(uid, VERIFY)

    async def _node_guard_loop(self) -> None:
        """At start (once the pod list gives the node's IPs, or after a bounded wait) and every pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.pod_informer.synced.wait(), NODE_GUARD_SYNC_WAIT)
        interval = self.config.repair_interval if self.config.repair_interval > 0 else NODE_GUARD_INTERVAL
        while True:
            try:
                await self.guard_node()
            except Exception:
                log.exception("checking the node's network namespace for capture rules failed")
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311

    async def guard_node(self) -> None:
        """Remove our rules from the node's own namespace; alarm (log, Event, metric, /readyz) if any."""
        ips = sorted({ip for pod in self.pods.objects.values() for ip in host_ips(pod)})
        loop = asyncio.get_running_loop()
        findings = await loop.run_in_executor(self.executor, nodeguard.sweep, self.config.proc_root, ips)
        self.metrics.node_netns_clean.set(0 if findings else 1)
        if not findings:
            self.node_alarm = None
            return
        self.node_alarms += 1
        self.metrics.node_netns_rules.inc()
        for finding in findings:
            log.error(
                "capture rules found in the node's own network namespace (%s), removed: %s",
                finding.where,
                "; ".join(finding.lines),
            )
        self.node_alarm = (
            "capture rules were found in the node's own network namespace and removed "
            "(see the Node's Events and the controller's log)"
        )
        message = (
            f"capture rules of istio-pod-network-controller were found in the node's own network namespace "
            f"and removed (occurrence {self.node_alarms} since start); the node's traffic may have been "
            "redirected meanwhile"
        )
        try:
            await self.kube.create_event(
                ev.build_node_warning(self.config.node_name, ev.CAPTURE_ON_NODE, message)
            )
        except Exception as exc:
            log.warning("node Event not recorded: %s", exc)

    async def _heartbeat(self) -> None:
        while True:
            self.beat = time.monotonic()
            self.metrics.queue_depth.set(self.queue.depth)
            if not self.ready and self._initial_sync_done():
                self.ready = True
                self.metrics.ready.set(1)
                log.info("initial sync done: %d pods on node %s", len(self.pods), self.config.node_name)
            await asyncio.sleep(HEARTBEAT if self.ready else 0.05)

    def _initial_sync_done(self) -> bool:
        return (
            self.pod_informer.synced.is_set()
            and self.ns_informer.synced.is_set()
            and self.initial is not None
            and not self.initial
        )

    def serving(self) -> bool:
        """/readyz: the initial sync is done, no informer is failing and the node's namespace was clean at
        the last check (after an alarm, until a later check finds nothing of ours there)."""
        return self.ready and not self._failing_informers() and self.node_alarm is None

    def _failing_informers(self) -> list[str]:
        return [
            name for name, i in (("pods", self.pod_informer), ("namespaces", self.ns_informer)) if i.failing
        ]

    def unready_reason(self) -> str:
        """/readyz's body when not ready: the preflight's reason, the sync, or the failing informers."""
        failing = self._failing_informers()
        if self.node_alarm is not None:
            return self.node_alarm
        if self.ready and failing:
            return f"{', '.join(failing)} informer failing (see the log and informer_failures_total)"
        return self.not_ready

    def healthy(self) -> bool:
        now = time.monotonic()
        if now - self.beat > 10 * HEARTBEAT:
            return False
        stuck = self.in_flight > 0 and now - self.last_progress > STALL_LIMIT + self.config.netns_deadline
        return not stuck and not any(t.done() for t in self._background)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def _preflight_passed(self) -> bool:
        """Re-run the checks until they pass (True) or SIGTERM (False); /readyz says why meanwhile.

        Each new failure is logged once and recorded as a Warning Event on the node (best effort: the API may
        be what failed).
        """
        reported = ""
        while self.preflight is not None and not self.stopping.is_set():
            report = await self.preflight()
            if report.ok:
                self.not_ready = "syncing"
                log.info("preflight passed: %s", "; ".join(c.reason() for c in report.checks))
                return True
            reason = report.reason()
            self.not_ready = f"preflight failed: {reason}"
            if reason != reported:
                reported = reason
                log.error("preflight failed (retrying every %.0fs): %s", self.preflight_retry, reason)
                event = node_event(self.config.node_name, f"preflight failed: {reason}")
                try:
                    await self.kube.create_event(event, attempts=1)
                except Exception as exc:
                    log.debug("preflight Event not recorded: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.preflight_retry)
        return not self.stopping.is_set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        log.debug("open files limit: %d (one pinned namespace per initialized pod)", raise_open_files_limit())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        status = StatusServer(self.metrics, self.healthy, self.serving, self.unready_reason)
        port = await status.start(self.config.listen_host, self.config.listen_port)
        log.info(
            "controller for node %s started; status on %s:%d; %d workers",
            self.config.node_name,
            self.config.listen_host,
            port,
            self.config.concurrency,
        )
        self._background.append(asyncio.create_task(self._heartbeat()))
        stop = asyncio.create_task(self.stopping.wait())
        informers: list[asyncio.Task[None]] = []
        if await self._preflight_passed():
            ns_task = asyncio.create_task(self.ns_informer.run())
            self._background.append(ns_task)
            informers.append(ns_task)
            # Pods wait for the first namespace list: the 2018 namespace rule is known when they are judged.
            synced = asyncio.create_task(self.ns_informer.synced.wait())
            await asyncio.wait({synced, stop}, return_when=asyncio.FIRST_COMPLETED)
            synced.cancel()
        workers: list[asyncio.Task[None]] = []
        if not self.stopping.is_set():
            informers.append(asyncio.create_task(self.pod_informer.run()))
            self._background.append(informers[-1])
            workers = [asyncio.create_task(self._worker()) for _ in range(self.config.concurrency)]
            if self.config.repair_interval > 0:
                self._background.append(asyncio.create_task(self._repair_loop()))
            self._background.append(asyncio.create_task(self._node_guard_loop()))
        await stop
        log.info("SIGTERM: no new work; finishing %d in-flight pods", self.in_flight)
        for task in self._background:
            if task not in workers:
                task.cancel()
        self.queue.shutdown()
        if workers:
            _, pending = await asyncio.wait(workers, timeout=self.config.shutdown_grace)
            for task in pending:
                task.cancel()
        await self.recorder.flush(timeout=3.0)
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._background, return_exceptions=True)
        await status.stop()
        await self.kube.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")
        return 0


async def run(
    config: ControllerConfig,
    preflight: Preflight | None = None,
    preflight_retry: float = PREFLIGHT_RETRY,
) -> int:
    return await Controller(config, preflight, preflight_retry).run()
