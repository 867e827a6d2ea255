"""One pod, one pass: view → decision (pure, see decision.py) → effects (data plane, mark, Events, metrics).

The blocking data-plane work (a /proc scan, setns threads, iptables-restore) runs on a thread pool; one
/proc scan serves every pod whose last change was seen before the scan started, so a burst of N pods costs
a handful of scans, not N.

Once a pod's rules are applied, its sandbox's network namespace stays pinned (an fd, checked by inode)
for as long as the pod lives, and every later verify or repair works on that namespace: no process the
tenant starts later can steer it elsewhere. The pin is trusted only while processes of the pod still live
in it and it holds the pod IPs the kubelet posts; a sandbox without them is dead or replaced (the kubelet
made a new one), so the pin is dropped and the new sandbox is found and captured at once, on the watch
event that carries the new IP.
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
from ..dataplane.netns import NetnsId, PinnedNetns
from ..errors import DataplaneError, SpecError
from ..rules.foreign import Bypass
from ..settings import annotations as ann
from ..settings.istio import cidr_notices, ignored_overrides, pod_spec
from ..settings.proxyids import ProxyIdGate, controller_gate
from ..settings.spec import InterceptSpec
from . import events as ev
from . import selection
from .backoff import Backoff
from .cache import NamespaceCache, Obj, PodCache
from .config import ControllerConfig
from .decision import Action, Applied, Apply, Invalid, Known, MarkReason, Skip, Verify, Warn, decide
from .kube import ApiStatusError, KubeClient
from .logs import PodLogger
from .metrics import Metrics
from .view import PodView

log = logging.getLogger(__name__)
T = TypeVar("T")
VERIFY = "verify"
"""Queue flag: verify the rules of a marked pod even if this process verified or applied them already."""


@dataclass(frozen=True, slots=True)
class Result:
    """The end of one pass: done, or try again after `retry_after` seconds."""

    retry_after: float | None = None


DONE = Result()


@dataclass(slots=True)
class PodState:
    first_seen: float
    changed_at: float
    failed_at: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.1, maximum=5.0))
    pending_since: float = 0.0
    """Start of the current attempt to capture (first sight, or a sandbox found dead): deadline origin."""
    settled: bool = False
    deadline_reported: bool = False
    attempted: bool = False
    awaiting_echo: str | None = None
    """resourceVersion of our last mark until the watch delivers it (or a relist replaces the cache).

    Until then an unmarked cached copy predates our own patch (say, the kubelet's status update queued while
    we applied) and acting on it would apply and mark twice. resourceVersions are opaque: only equality is
    used, as the API conventions require.
    """
    applied: Applied | None = None
    pin: PinnedNetns | None = None
    """The sandbox's namespace the rules were applied to, held open for the pod's lifetime."""
    sandbox_lost: bool = False
    """The pinned sandbox died; until its successor is captured, an application counts as Reinitialized."""
    busy: bool = False
    foreign_reported: bool = False

    def drop_pin(self) -> None:
        if self.pin is not None:
            self.pin.close()
        self.pin = None
        self.applied = None


MAX_BYPASSES_SHOWN = 4
"""Distinct bypass findings named in one Event (the rest are counted; the log has them all)."""


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What the data-plane job did: applied (a result) or verified in place (None), in which namespace."""

    pin: PinnedNetns
    drift: Drift | None
    result: ApplyResult | None
    others: tuple[NetnsId, ...]
    timings: dict[str, float]


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


def sandbox_alive(index: ProcIndex, view: PodView, pin: PinnedNetns) -> tuple[bool, tuple[NetnsId, ...]]:
    """Whether processes of the pod still live in the pinned namespace and it holds the pod's IPs now
    (an IP the kubelet posts is the sandbox's: one the pin lacks means a new sandbox); and the others."""
    uid, ips = view.uid, view.ips
    if not pin.intact():
        return False, ()
    live = index.namespaces(uid, view.host_ips)
    alive = pin.id in live and (not ips or index.holds(uid, pin.id, ips))
    return alive, tuple(ns for ns in live if ns != pin.id)


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
    ) -> None:
        self.config = config
        self.pods = pods
        self.namespaces = namespaces
        self.kube = kube
        self.recorder = recorder
        self.metrics = metrics
        self.executor = executor
        self.scans = ScanCache(config.proc_root, executor)
        self.states: dict[str, PodState] = {}

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def observe(self, uid: str, resource_version: str | None = None, *, relisted: bool = False) -> None:
        """A change to the pod was seen: a watch event carrying `resource_version`, or a relist."""
        now = time.monotonic()
        state = self.states.get(uid)
        if state is None:
            self.states[uid] = PodState(first_seen=now, changed_at=now, pending_since=now)
            return
        state.changed_at = now
        if relisted or (resource_version is not None and resource_version == state.awaiting_echo):
            state.awaiting_echo = None

    def forget(self, uid: str) -> None:
        """The pod is gone: drop its state and its pin (after the pass that may be using it)."""
        state = self.states.pop(uid, None)
        if state is not None and not state.busy:
            state.drop_pin()
        self.recorder.forget(uid)

    def select(self, pod: Obj) -> selection.Decision:
        ns = self.namespaces.get(pod["metadata"].get("namespace", ""))
        return selection.select(pod, ns, self.config.selection)

    def _wants_mesh(self, pod: Obj) -> bool:
        return self.select({**pod, "spec": {**pod.get("spec", {}), "hostNetwork": False}}).selected

    async def _blocking(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    # -- the pass ------------------------------------------------------------------------------------------

    def gate(self, view: PodView) -> ProxyIdGate | None:
        """--ignore-pod-overrides for this pod: the proxy ids Istio's injector picks for its namespace (from
        the namespace cache, which start-up fills before any pod is judged) or the controller's."""
        if not self.config.ignore_pod_overrides:
            return None
        ns = self.namespaces.get(view.namespace) or {}
        notes = (ns.get("metadata") or {}).get("annotations")
        return controller_gate(notes if isinstance(notes, dict) else None, self.config.spec_defaults)

    def plan(self, view: PodView, state: PodState, flags: frozenset[str], gate: ProxyIdGate | None) -> Action:
        """The pure decision, fed from the cache and this process's memory of the pod."""
        verdict = self.select(view.raw)
        spec: InterceptSpec | SpecError
        try:
            spec = pod_spec(view.raw, self.config.spec_defaults, gate=gate)
        except SpecError as exc:
            spec = exc
        wants_mesh = verdict.reason == selection.HOST_NETWORK and self._wants_mesh(view.raw)
        known = Known(state.applied, state.awaiting_echo is not None, state.sandbox_lost)
        return decide(view, verdict, spec, known, verify=VERIFY in flags, wants_mesh=wants_mesh)

    async def reconcile(self, uid: str, flags: frozenset[str] = frozenset()) -> Result:
        """Bring one pod to its wanted state."""
        pod = self.pods.get(uid)
        if pod is None:
            self.forget(uid)
            return DONE
        state = self.states.get(uid)
        if state is None:
            self.observe(uid)
            state = self.states[uid]
        state.attempted = True
        view = PodView.of(pod)
        plog = PodLogger(log, view, self.recorder)
        gate = self.gate(view)
        action = self.plan(view, state, flags, gate)
        ignored = ignored_overrides(view.raw, gate)
        if ignored and not isinstance(action, Skip | Warn):
            # Only our own names of the fields reach the Event, never the pod's values.
            plog.warn_event(
                ev.OVERRIDE_IGNORED,
                f"{', '.join(ignored)} ignored (controller flag --ignore-pod-overrides): a pod's proxy "
                "uid/gid counts only as Istio's injector picks it for the namespace or as the "
                "controller's; the controller-wide proxy identity, IPv6 policy and owner groups apply",
            )
        if isinstance(action, Verify | Apply):
            for notice in cidr_notices(view.annotations):
                plog.warn_event(ev.CIDR_MASKED, notice)
        state.busy = True
        try:
            return await self.execute(view, state, action, plog)
        finally:
            state.busy = False
            if self.states.get(uid) is not state:  # deleted meanwhile
                state.drop_pin()

    async def execute(self, view: PodView, state: PodState, action: Action, plog: PodLogger) -> Result:
        match action:
            case Skip(reason, release):
                if reason.startswith("not selected: "):
                    self.metrics.skipped.labels(reason.removeprefix("not selected: ")).inc()
                if release:
                    state.drop_pin()
                plog.debug("%s", reason)
                return DONE
            case Warn(reason, notices):
                self.metrics.skipped.labels(reason).inc()
                for notice in notices:
                    plog.warn_event(notice.reason, notice.message)
                return DONE
            case Invalid():
                self.metrics.failed.labels("invalid_config").inc()
                plog.warn_event(ev.INVALID_CONFIG, action.message)
                return DONE
            case Verify() | Apply():
                return await self._capture(view, state, action, plog)

    async def _capture(
        self, view: PodView, state: PodState, action: Verify | Apply, plog: PodLogger
    ) -> Result:
        index = await self.scans.index(max(state.changed_at, state.failed_at))
        why = action.why if isinstance(action, Apply) else MarkReason.REPAIRED
        others: tuple[NetnsId, ...] = ()
        pin = state.pin
        if pin is not None:
            alive, others = await self._blocking(lambda: sandbox_alive(index, view, pin))
            if not alive or why is MarkReason.REINITIALIZED:
                plog.info("sandbox %s is gone (%s): capturing the new one", pin.id, action.reason)
                state.drop_pin()
                state.sandbox_lost = True
                why = MarkReason.REINITIALIZED
        if why is MarkReason.REINITIALIZED:
            self._restart_deadline(state)
        verify_first = isinstance(action, Verify) and why is MarkReason.REPAIRED
        plog.debug("%s: %s", "verify" if verify_first else "apply", action.reason)
        try:
            outcome = await self._blocking(
                self._job(index, view, state.pin, others, action.spec, verify_first)
            )
        except PodNetnsNotFound as exc:
            return self._not_yet(state, plog, "netns_not_found", ev.NETNS_NOT_FOUND, exc)
        except (DataplaneError, OSError, ValueError) as exc:
            # ValueError: kernel state we could not parse (a pod's tables and links are its own to name)
            # is this pod's failure, retried and reported once, never a traceback of the controller.
            plog.warning("applying capture rules failed: %s", exc)
            return self._not_yet(state, plog, "apply_error", ev.APPLY_FAILED, exc)
        for stage, seconds in outcome.timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        if state.pin is not outcome.pin:
            state.drop_pin()
            state.pin = outcome.pin
        self._report_foreign(state, outcome.others, plog)
        if outcome.drift is not None and outcome.drift.bypasses:
            self._report_bypasses(outcome.drift.bypasses, plog)
        if outcome.result is None:
            self._settle(state, view, action.digest if isinstance(action, Verify) else "")
            return DONE
        return await self._mark(view, state, outcome, why, plog)

    def _job(
        self,
        index: ProcIndex,
        view: PodView,
        pin: PinnedNetns | None,
        others: tuple[NetnsId, ...],
        spec: InterceptSpec,
        verify_first: bool,
    ) -> Callable[[], JobOutcome]:
        """The blocking part: find and pin the sandbox (unless pinned), verify and/or apply; timings in s."""
        cfg = self.config

        def work() -> JobOutcome:
            timings: dict[str, float] = {}
            started = time.perf_counter()
            target, strays = pin, others
            if target is None:
                found = index.find(
                    view.uid, container_ids=view.container_ids, pod_ips=view.ips, host_ips=view.host_ips
                )
                target, strays = found.netns, found.others
            timings["discover"] = time.perf_counter() - started
            try:
                drift = None
                pids = [p.pid for p in index.processes(view.uid)]
                if verify_first:
                    started = time.perf_counter()
                    drift = dataplane.verify(
                        target, spec, cfg.backend, proc_root=cfg.proc_root, pod_pids=pids
                    )
                    timings["verify"] = time.perf_counter() - started
                    if drift.ours_in_place:  # re-applying cannot outrun a foreign rule that runs first
                        return JobOutcome(target, drift, None, strays, timings)
                started = time.perf_counter()
                result = dataplane.apply(target, spec, cfg.backend, proc_root=cfg.proc_root, pod_pids=pids)
                timings["apply"] = time.perf_counter() - started
            except BaseException:
                if target is not pin:
                    target.close()
                raise
            return JobOutcome(target, drift, result, strays, timings)

        return work

    def _restart_deadline(self, state: PodState) -> None:
        if state.settled:
            state.settled = False
            state.pending_since = time.monotonic()
            state.deadline_reported = False

    def _settle(self, state: PodState, view: PodView, digest: str) -> None:
        """The pod's rules are in place in the pinned sandbox, for the pod as `view` shows it."""
        assert state.pin is not None  # noqa: S101 - set by the job that just succeeded
        state.applied = Applied(digest, state.pin.id, view.ips, view.container_ids)
        state.sandbox_lost = False
        state.settled = True
        state.deadline_reported = False
        state.backoff.reset()

    def _report_foreign(self, state: PodState, others: tuple[NetnsId, ...], plog: PodLogger) -> None:
        """Processes of the pod in other namespaces: never the pod's capture target, but worth a Warning."""
        if not others or state.foreign_reported:
            return
        state.foreign_reported = True
        self.metrics.foreign_netns.inc()
        plog.warn_event(
            ev.FOREIGN_NETNS,
            "processes of this pod run in a network namespace of their own, outside the pod's sandbox; "
            "capture rules are kept in the sandbox's namespace only",
            detail=f"sandbox {state.pin.id if state.pin else '?'}, others {', '.join(map(str, others))}",
        )

    def _report_bypasses(self, found: tuple[Bypass, ...], plog: PodLogger) -> None:
        """Foreign rules that run before ours: one Warning per distinct finding set, counted every pass."""
        self.metrics.bypasses.inc(len(found))
        public = sorted({b.public for b in found})
        more = len(public) - MAX_BYPASSES_SHOWN
        shown = "; ".join(public[:MAX_BYPASSES_SHOWN]) + (f"; and {more} more" if more > 0 else "")
        plog.warn_event(
            ev.CAPTURE_BYPASSED,
            f"foreign rules outside the capture chains run first and can keep this pod's traffic from them "
            f"(the capture rules themselves are in place): {shown}",
            detail="; ".join(str(b) for b in found),
        )

    def _not_yet(
        self, state: PodState, plog: PodLogger, reason: str, event_reason: str, exc: Exception
    ) -> Result:
        """Retry with backoff until the deadline; then one Warning, and wait for the pod's next event."""
        state.failed_at = time.monotonic()
        if state.failed_at - state.pending_since < self.config.netns_deadline:
            delay = state.backoff.next()
            plog.debug("not ready (%s), retrying in %.2fs: %s", reason, delay, exc)
            return Result(delay)
        if not state.deadline_reported:
            state.deadline_reported = True
            self.metrics.failed.labels(reason).inc()
            plog.warning("gave up after %.0fs: %s", self.config.netns_deadline, exc)
            if isinstance(exc, PodNetnsNotFound):
                sentence = (
                    "no network namespace can be attributed to this pod's sandbox (not started, exited, "
                    "or not the one its status describes); the controller's log has the details"
                )
            else:
                sentence = ev.public_text(exc)
            plog.warn_event(
                event_reason, f"no capture rules after {self.config.netns_deadline:.0f}s: {sentence}"
            )
        return DONE

    async def _mark(
        self, view: PodView, state: PodState, outcome: JobOutcome, why: MarkReason, plog: PodLogger
    ) -> Result:
        """Record what was applied; patch the mark when the pod does not carry it yet; count and tell."""
        result = outcome.result
        assert result is not None  # noqa: S101 - only applications are marked
        if not (view.marked and view.digest == result.fingerprint):
            patch_started = time.perf_counter()
            try:
                version = await self.kube.patch_pod_annotations(
                    view.namespace,
                    view.name,
                    {ann.STATUS: ann.STATUS_INITIALIZED, ann.SPEC_DIGEST: result.fingerprint},
                )
            except ApiStatusError as exc:
                if exc.code == 404:
                    return DONE  # deleted meanwhile; the watch will say so
                self.metrics.failed.labels("patch_error").inc()
                state.failed_at = time.monotonic()
                delay = state.backoff.next(exc.retry_after)
                plog.warning("marking failed (%s), retrying in %.2fs", exc, delay)
                return Result(delay)
            self.metrics.stage_seconds.labels("patch").observe(time.perf_counter() - patch_started)
            state.awaiting_echo = version or None
        self._settle(state, view, result.fingerprint)
        detail = f"with {result.backend} in {result.seconds * 1000:.1f} ms (spec {result.fingerprint})"
        match why:
            case MarkReason.INITIALIZED:
                self.metrics.initialized.inc()
                self.metrics.end_to_end_seconds.observe(time.monotonic() - state.first_seen)
                plog.normal(why, f"capture rules installed by {self.recorder.node} {detail}")
            case MarkReason.RECONFIGURED:
                self.metrics.reconfigured.inc()
                plog.normal(why, f"interception annotations changed; capture rules re-applied {detail}")
            case MarkReason.REPAIRED:
                lines = len(outcome.drift.lines) if outcome.drift else 0
                self.metrics.repaired.inc()
                plog.normal(
                    why, f"capture rules were missing or changed ({lines} differences); re-applied {detail}"
                )
            case MarkReason.REINITIALIZED:
                self.metrics.reinitialized.inc()
                plog.normal(why, f"the pod's sandbox was recreated; capture rules installed in it {detail}")
        return DONE
