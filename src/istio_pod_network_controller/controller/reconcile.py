"""One pod, one pass: select → spec → discover → apply (or verify) → mark, with Events and metrics.

The blocking data-plane work (a /proc scan, setns threads, iptables-restore) runs on a thread pool; one
/proc scan serves every pod whose last change was seen before the scan started, so a burst of N pods costs
a handful of scans, not N.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

from ..dataplane import apply as dataplane
from ..dataplane.apply import ApplyResult, Drift
from ..dataplane.discovery import PodNetnsNotFound, ProcIndex
from ..errors import DataplaneError, SpecError, public_message
from ..settings import annotations as ann
from ..settings.spec import InterceptSpec, IPv6Policy, build_spec
from . import events as ev
from . import selection
from .backoff import Backoff
from .cache import NamespaceCache, Obj, PodCache, pod_ips
from .config import ControllerConfig
from .kube import ApiStatusError, KubeClient
from .logs import pod_extra
from .metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
VERIFY = "verify"
"""Queue flag: verify the rules of a marked pod even if this process verified or applied them already."""


@dataclass(slots=True)
class PodState:
    first_seen: float
    changed_at: float
    failed_at: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.1, maximum=5.0))
    in_place: str | None = None
    """The spec digest this process applied or verified in the pod; skips re-verifying our own patch echo."""
    deadline_reported: bool = False
    attempted: bool = False
    awaiting_echo: str | None = None
    """resourceVersion of our last mark until the watch delivers it (or a relist replaces the cache).

    Until then an unmarked cached copy predates our own patch (say, the kubelet's status update queued while
    we applied) and acting on it would apply and mark twice. resourceVersions are opaque: only equality is
    used, as the API conventions require.
    """


class ScanCache:
    """Shares ProcIndex scans: a caller gets a scan that started after `not_before`, taking one if needed."""

    def __init__(self, proc_root: str, executor: Executor) -> None:
        self.proc_root = proc_root
        self._executor = executor
        self._lock = asyncio.Lock()
        self._index: ProcIndex | None = None
        self._started = 0.0
        self.scans = 0

    async def index(self, not_before: float) -> ProcIndex:
        async with self._lock:
            if self._index is None or self._started < not_before:
                started = time.monotonic()
                loop = asyncio.get_running_loop()
                self._index = await loop.run_in_executor(self._executor, ProcIndex.scan, self.proc_root)
                self._started = started
                self.scans += 1
            return self._index


def candidate_digests(spec: InterceptSpec) -> set[str]:
    """Digests an application of `spec` can record: IPv6 `auto` resolves to capture or block per pod."""
    if spec.ipv6 is IPv6Policy.AUTO:
        return {spec.with_ipv6(True).fingerprint(), spec.with_ipv6(False).fingerprint()}
    return {spec.fingerprint()}


class Reconciler:
    def __init__(
        self,
        config: ControllerConfig,
        pods: PodCache,
        namespaces: NamespaceCache,
        kube: KubeClient,
        recorder: ev.EventRecorder,
        metrics: Metrics,
        executor: Executor,
        flag_of: Callable[[str], str],
    ) -> None:
        self.config = config
        self.pods = pods
        self.namespaces = namespaces
        self.kube = kube
        self.recorder = recorder
        self.metrics = metrics
        self.executor = executor
        self.flag_of = flag_of
        self.scans = ScanCache(config.proc_root, executor)
        self.states: dict[str, PodState] = {}

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def observe(self, uid: str, resource_version: str | None = None, *, relisted: bool = False) -> None:
        """A change to the pod was seen: a watch event carrying `resource_version`, or a relist."""
        now = time.monotonic()
        state = self.states.get(uid)
        if state is None:
            self.states[uid] = PodState(first_seen=now, changed_at=now)
            return
        state.changed_at = now
        if relisted or (resource_version is not None and resource_version == state.awaiting_echo):
            state.awaiting_echo = None

    def forget(self, uid: str) -> None:
        self.states.pop(uid, None)
        self.recorder.forget(uid)

    def decide(self, pod: Obj) -> selection.Decision:
        ns = self.namespaces.get(pod["metadata"].get("namespace", ""))
        return selection.select(pod, ns, self.config.selection)

    async def _blocking(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    # -- the pass ------------------------------------------------------------------------------------------

    async def reconcile(self, uid: str, flags: frozenset[str] = frozenset()) -> float | None:
        """Bring one pod to its wanted state; returns a delay after which to try again, or None."""
        pod = self.pods.get(uid)
        if pod is None:
            self.forget(uid)
            return None
        state = self.states.get(uid)
        if state is None:
            self.observe(uid)
            state = self.states[uid]
        state.attempted = True
        extra = pod_extra(pod)
        decision = self.decide(pod)
        meta_ann: dict[str, str] = pod["metadata"].get("annotations") or {}
        marked = meta_ann.get(ann.STATUS) == ann.STATUS_INITIALIZED
        if state.awaiting_echo is not None and not marked:
            # A copy from before our own patch; the patch's echo queues the pod again.
            log.debug("skipping a copy older than our mark", extra=extra)
            return None
        if not decision.selected:
            self.metrics.skipped.labels(decision.reason).inc()
            if marked and decision.reason not in (selection.DELETING, selection.FINISHED):
                # Fail closed: an annotation or label edit never removes capture from a running pod.
                message = (
                    f"pod no longer selected ({decision.reason}) after its capture rules were installed; "
                    "the rules are kept (only deleting the pod removes them)"
                )
                if self.recorder.record(pod, ev.WARNING, ev.CAPTURE_KEPT, message):
                    log.warning("%s", message, extra=extra)
            if decision.reason == selection.HOST_NETWORK and self._wanted_mesh(pod):
                self.recorder.record(
                    pod,
                    ev.WARNING,
                    ev.HOST_NETWORK_SKIPPED,
                    "hostNetwork pod asks for mesh capture; the node's own network is never "
                    "changed, so this pod gets no capture rules",
                )
            log.debug("not selected: %s", decision.reason, extra=extra)
            return None
        try:
            spec = build_spec(meta_ann, self.config.spec_defaults, default_source=self.flag_of)
        except SpecError as exc:
            self.metrics.failed.labels("invalid_config").inc()
            if marked:
                message = f"{exc}; the capture rules installed before are kept unchanged (fail closed)"
            else:
                message = f"{exc}; capture rules not installed (fail closed)"
            if self.recorder.record(pod, ev.WARNING, ev.INVALID_CONFIG, message):
                log.warning("invalid interception config: %s", message, extra=extra)
            return None

        digest = meta_ann.get(ann.SPEC_DIGEST)
        if marked and digest in candidate_digests(spec):
            if VERIFY not in flags and state.in_place == digest:
                return None
            return await self._verify(pod, spec, state, digest or "")
        return await self._apply(pod, spec, state, reconfigure=marked)

    def _wanted_mesh(self, pod: Obj) -> bool:
        as_pod_network = {**pod, "spec": {**pod.get("spec", {}), "hostNetwork": False}}
        return self.decide(as_pod_network).selected

    async def _index_for(self, state: PodState) -> ProcIndex:
        return await self.scans.index(max(state.changed_at, state.failed_at))

    def _job(
        self, index: ProcIndex, pod: Obj, spec: InterceptSpec, verify_first: bool
    ) -> Callable[[], tuple[Drift | None, ApplyResult | None, dict[str, float]]]:
        """The blocking part: pin the pod's netns, verify and/or apply; stage timings in seconds."""
        uid = pod["metadata"]["uid"]
        cids = pod["status"].get("containerIDs") or ()
        ips = pod_ips(pod)
        cfg = self.config

        def work() -> tuple[Drift | None, ApplyResult | None, dict[str, float]]:
            timings: dict[str, float] = {}
            started = time.perf_counter()
            with index.find(uid, container_ids=cids, pod_ips=ips) as found:
                timings["discover"] = time.perf_counter() - started
                drift = None
                if verify_first:
                    started = time.perf_counter()
                    drift = dataplane.verify(found.netns, spec, cfg.backend, proc_root=cfg.proc_root)
                    timings["verify"] = time.perf_counter() - started
                    if drift.in_place:
                        return drift, None, timings
                started = time.perf_counter()
                result = dataplane.apply(found.netns, spec, cfg.backend, proc_root=cfg.proc_root)
                timings["apply"] = time.perf_counter() - started
                return drift, result, timings

        return work

    def _observe_timings(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)

    async def _run_job(
        self, pod: Obj, spec: InterceptSpec, state: PodState, verify_first: bool
    ) -> tuple[Drift | None, ApplyResult | None] | float | None:
        """Run the data-plane job; on failure, the retry delay (or None once the deadline passed)."""
        extra = pod_extra(pod)
        index = await self._index_for(state)
        try:
            drift, result, timings = await self._blocking(self._job(index, pod, spec, verify_first))
        except PodNetnsNotFound as exc:
            log.debug("pod network namespace not found: %s", exc, extra=extra)
            return self._not_yet(pod, state, "netns_not_found", ev.NETNS_NOT_FOUND, public_message(exc))
        except (DataplaneError, ValueError, OSError) as exc:
            log.warning("applying capture rules failed: %s", exc, extra=extra)
            return self._not_yet(pod, state, "apply_error", ev.APPLY_FAILED, public_message(exc))
        self._observe_timings(timings)
        return drift, result

    def _not_yet(
        self, pod: Obj, state: PodState, reason: str, event_reason: str, message: str
    ) -> float | None:
        """Retry with backoff until the deadline; then one Warning, and wait for the pod's next event."""
        state.failed_at = time.monotonic()
        if state.failed_at - state.first_seen < self.config.netns_deadline:
            delay = state.backoff.next()
            log.debug("not ready (%s), retrying in %.2fs: %s", reason, delay, message, extra=pod_extra(pod))
            return delay
        if not state.deadline_reported:
            state.deadline_reported = True
            self.metrics.failed.labels(reason).inc()
            log.warning("gave up after %.0fs: %s", self.config.netns_deadline, message, extra=pod_extra(pod))
            self.recorder.record(
                pod,
                ev.WARNING,
                event_reason,
                f"no capture rules after {self.config.netns_deadline:.0f}s: {message}",
            )
        return None

    async def _verify(self, pod: Obj, spec: InterceptSpec, state: PodState, digest: str) -> float | None:
        outcome = await self._run_job(pod, spec, state, verify_first=True)
        if not isinstance(outcome, tuple):
            return outcome
        drift, result = outcome
        if result is None:
            state.in_place = digest
            state.backoff.reset()
            return None
        lines = len(drift.lines) if drift else 0
        self.metrics.repaired.inc()
        log.info("repaired capture rules (%d lines of drift)", lines, extra=pod_extra(pod))
        self.recorder.record(
            pod,
            ev.NORMAL,
            ev.REPAIRED,
            f"capture rules were missing or changed ({lines} differences); re-applied with "
            f"{result.backend} (spec {result.fingerprint})",
        )
        if result.fingerprint != digest:
            return await self._mark(pod, state, result, started=None)
        state.in_place = digest
        state.backoff.reset()
        return None

    async def _apply(self, pod: Obj, spec: InterceptSpec, state: PodState, reconfigure: bool) -> float | None:
        outcome = await self._run_job(pod, spec, state, verify_first=False)
        if not isinstance(outcome, tuple):
            return outcome
        _, result = outcome
        assert result is not None  # noqa: S101 - apply-only jobs always return a result
        return await self._mark(
            pod, state, result, started=None if reconfigure else state.first_seen, reconfigure=reconfigure
        )

    async def _mark(
        self, pod: Obj, state: PodState, result: ApplyResult, started: float | None, reconfigure: bool = False
    ) -> float | None:
        meta = pod["metadata"]
        extra = pod_extra(pod)
        patch_started = time.perf_counter()
        try:
            version = await self.kube.patch_pod_annotations(
                meta["namespace"],
                meta["name"],
                {ann.STATUS: ann.STATUS_INITIALIZED, ann.SPEC_DIGEST: result.fingerprint},
            )
        except ApiStatusError as exc:
            if exc.code == 404:
                return None  # deleted meanwhile; the watch will say so
            self.metrics.failed.labels("patch_error").inc()
            state.failed_at = time.monotonic()
            delay = state.backoff.next(exc.retry_after)
            log.warning("marking failed (%s), retrying in %.2fs", exc, delay, extra=extra)
            return delay
        self.metrics.stage_seconds.labels("patch").observe(time.perf_counter() - patch_started)
        state.awaiting_echo = version or None
        state.in_place = result.fingerprint
        state.backoff.reset()
        state.deadline_reported = False
        detail = f"with {result.backend} in {result.seconds * 1000:.1f} ms (spec {result.fingerprint})"
        if reconfigure:
            self.metrics.reconfigured.inc()
            log.info("spec changed: capture rules re-applied %s", detail, extra=extra)
            self.recorder.record(
                pod,
                ev.NORMAL,
                ev.RECONFIGURED,
                f"interception annotations changed; capture rules re-applied {detail}",
            )
        elif started is not None:
            self.metrics.initialized.inc()
            self.metrics.end_to_end_seconds.observe(time.monotonic() - started)
            log.info("initialized: capture rules installed %s", detail, extra=extra)
            self.recorder.record(
                pod, ev.NORMAL, ev.INITIALIZED, f"capture rules installed by {self.recorder.node} {detail}"
            )
        return None
