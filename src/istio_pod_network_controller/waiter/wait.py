"""The waiting loop: probe fast, fall back to the status annotation only where allowed, time out helpfully.

Decision rules (docs/waiter.md):
- A probe applies: exit 0 once every family to probe has been proven; the status annotation alone is
  accepted only with --trust-annotation (a forged annotation must not open the pod).
- The spec captures nothing (interceptionMode NONE): no rules to prove, so the status annotation decides
  (with --require-probe: refuse at once).
- The spec captures something but no probe can prove it (lo excluded, waiter with the proxy gid but not its
  uid, ...): refuse at once (exit 5) unless --trust-annotation says the annotation is enough.
Probe attempts: the first immediately, then every max(10 ms, min(500 ms, waited/8)); the annotations file is
re-read at most every --delay seconds and only when the annotation can decide. A heartbeat line every
--heartbeat seconds says what the waiter waits for and what it last saw.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from ..errors import ControllerError, DownwardAPIError, SpecError
from ..settings import annotations as ann
from ..settings.addresses import has_global_ipv6
from ..settings.downward import MAX_FILE_BYTES, parse_annotations
from ..settings.proxyids import gate_annotations, waiter_gate
from ..settings.spec import InterceptSpec, build_spec
from . import exitcodes
from .blockprobe import BlockedProbe
from .probe import FamilyProbe, Outcome
from .probeplan import Path, ProbePlan, ProbeTarget, plan_probe

DEFAULT_FILE = "/etc/podinfo/pod_annotations"
MIN_INTERVAL = 0.010
MAX_INTERVAL = 0.500
BACKOFF_FRACTION = 0.125
HEARTBEAT = 5.0
CONTROLLER_SELECTOR = "app.kubernetes.io/component=controller"


def next_interval(waited: float) -> float:
    """Seconds until the next probe attempt, after `waited` seconds since the first one."""
    return max(MIN_INTERVAL, min(MAX_INTERVAL, waited * BACKOFF_FRACTION))


class Probe(Protocol):
    label: str

    def describe(self) -> str: ...

    def attempt(self) -> Outcome: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Config:
    file: str = DEFAULT_FILE
    annotation_key: str = ann.STATUS
    annotation_value: str = ann.STATUS_INITIALIZED
    timeout: float = 300.0
    delay: float = 10.0
    trust_annotation: bool = False
    require_probe: bool = False
    verbose: bool = False
    controller_namespace: str = ""
    """Where the controller runs (injection passes the chart's namespace); empty: unknown, search all."""
    heartbeat: float = HEARTBEAT
    defaults: Mapping[str, str] = field(default_factory=dict)
    """Controller-default settings (Setting.name -> raw text) from flags/environment."""
    ignore_pod_overrides: bool = False
    """As the controller's flag: the pod's annotations.GATEABLE_OVERRIDES do not count, but for proxy ids
    settings.proxyids.waiter_gate admits (the ids injection runs the waiter as; on OpenShift, the range's)."""
    default_source: Callable[[str], str] = lambda name: "--" + name.replace("_", "-")


class Failure(ControllerError):
    """Ends the waiter with `code` and a one-line `message`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class FileState:
    present: bool
    annotations: dict[str, str]


def read_file(path: str) -> FileState:
    """The annotations file: missing means no annotations; unreadable or garbage raises Failure(BAD_FILE)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return FileState(False, {})
    except OSError as exc:
        raise Failure(
            exitcodes.BAD_FILE, f"cannot read annotations file {path}: {exc.strerror or exc}"
        ) from None
    try:
        return FileState(True, parse_annotations(data.decode("utf-8")))
    except UnicodeDecodeError:
        raise Failure(exitcodes.BAD_FILE, f"annotations file {path}: not UTF-8 text") from None
    except DownwardAPIError as exc:
        raise Failure(exitcodes.BAD_FILE, f"annotations file {path}: {exc}") from None


def resolve_spec(
    config: Config, annotations: Mapping[str, str], euid: int | None = None, egid: int | None = None
) -> InterceptSpec:
    """Flags first on their own (a bad flag is a usage error), then the pod's annotations on top; under
    --ignore-pod-overrides the proxy ids the waiter's own uid/gid or the flags name (settings.proxyids)."""
    try:
        build_spec({}, config.defaults, config.default_source)
    except SpecError as exc:
        raise Failure(exitcodes.USAGE, f"invalid setting: {exc}") from None
    if config.ignore_pod_overrides:
        euid = os.geteuid() if euid is None else euid
        egid = os.getegid() if egid is None else egid
        annotations = gate_annotations(annotations, waiter_gate(euid, egid, config.defaults))[0]
    try:
        return build_spec(annotations, config.defaults, config.default_source)
    except SpecError as exc:
        raise Failure(
            exitcodes.BAD_ANNOTATION,
            f"{exc}; the controller refuses such a pod, so its traffic will never be captured: fix the "
            "annotation and recreate the pod",
        ) from None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the waiter knows at one moment: the heartbeat and the timeout advice are functions of it."""

    waited: float
    timeout: float
    attempts: int
    probes: tuple[str, ...]
    """describe() of every probe; empty when no probe applies."""
    last: tuple[str, ...]
    """The last outcome of every probe, or nothing before the first attempt."""
    pending: tuple[str, ...]
    """Labels of the probes still unproven."""
    plan_reason: str
    file: str
    file_present: bool
    key: str
    value: str
    seen: str | None
    annotation_decides: bool
    pod: str
    pod_namespace: str
    controller_namespace: str


def _annotation_text(snap: Snapshot) -> str:
    if not snap.file_present:
        return f"file {snap.file} is missing"
    if snap.seen is None:
        return f"absent from {snap.file}"
    return repr(snap.seen)


def heartbeat_line(snap: Snapshot) -> str:
    """One line every few seconds: what the waiter waits for and what it saw last."""
    head = f"still waiting ({snap.waited:.0f}s of {snap.timeout:g}s)"
    annotation = f"annotation {snap.key}: {_annotation_text(snap)}"
    if snap.pending:
        last = "; ".join(snap.last) if snap.last else "no attempt yet"
        return (
            f"{head}: for the capture rules to redirect the probe ({', '.join(snap.pending)} unproven, "
            f"{snap.attempts} attempts); last: {last}; {annotation}"
        )
    return f"{head}: for {snap.key}={snap.value!r} ({snap.plan_reason or 'trusted'}); {annotation}"


def timeout_message(snap: Snapshot) -> str:
    """The advice printed when --timeout passes (pure: everything it says is in the snapshot)."""
    key, value = snap.key, snap.value
    lines = [f"waiter: timed out after {snap.timeout:g}s: this pod's traffic capture is not confirmed"]
    for detail in snap.last:
        lines.append(f"  last probe ({snap.attempts} attempts): {detail}")
    if not snap.probes:
        lines.append(f"  no probe applies: {snap.plan_reason}")
    if snap.annotation_decides:
        verdict = "accepted as proof once present"
    elif snap.seen == value:
        verdict = "present, but the probe shows no capture: forged, or the rules were removed since"
    else:
        verdict = "not accepted on its own without --trust-annotation"
    if snap.controller_namespace:
        where = f"-n {snap.controller_namespace} -l {CONTROLLER_SELECTOR}"
    else:
        where = f"--all-namespaces -l {CONTROLLER_SELECTOR}"
    ns_flag = f" -n {snap.pod_namespace}" if snap.pod_namespace else ""
    ctl_ns = f" -n {snap.controller_namespace}" if snap.controller_namespace else ""
    pod = snap.pod or "<this pod>"
    lines += [
        f"  annotation {key}: {_annotation_text(snap)} (wanted {value!r}; {verdict})",
        "  check:",
        f"  - is the controller running on this node? kubectl get pods {where} -o wide "
        "(one Ready pod on this pod's NODE)",
        "  - does this pod match the controller's selection rules (e.g. the 2018 "
        f'{ann.LEGACY_INITIALIZE}="true" on the pod or its namespace, or sidecar injection)?',
        f"  - the pod's Events: kubectl{ns_flag} describe pod {pod} (refusals are reported there)",
        f"  - the controller's log on this node: kubectl logs{ctl_ns} <that controller pod>",
    ]
    return "\n".join(lines)


class Waiter:
    def __init__(
        self,
        config: Config,
        *,
        err: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        euid: int | None = None,
        egid: int | None = None,
        global_ipv6: Callable[[], bool] = has_global_ipv6,
        make_probe: Callable[[ProbeTarget, ProbePlan], Probe] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.err = err if err is not None else sys.stderr
        self.clock = clock
        self.sleep = sleep
        self.started = clock()
        self.euid = os.geteuid() if euid is None else euid
        self.egid = os.getegid() if egid is None else egid
        self.global_ipv6 = global_ipv6
        self.make_probe = make_probe or _family_probe
        self.environ = os.environ if environ is None else environ
        self.last_state: dict[str, str] = {}
        self.last_detail: dict[str, str] = {}
        self.attempts = 0
        self.annotation_note = ""
        self.plan: ProbePlan | None = None
        self.probes: list[Probe] = []
        self.pending: list[Probe] = []
        self.state = FileState(False, {})
        self.annotation_decides = False

    # --- output --------------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        self.err.write(f"waiter +{self.clock() - self.started:.3f}s: {message}\n")
        self.err.flush()

    def debug(self, message: str) -> None:
        if self.config.verbose:
            self.log(f"debug: {message}")

    def snapshot(self) -> Snapshot:
        cfg = self.config
        return Snapshot(
            waited=self.clock() - self.started,
            timeout=cfg.timeout,
            attempts=self.attempts,
            probes=tuple(p.describe() for p in self.probes),
            last=tuple(self.last_detail.values()),
            pending=tuple(p.label for p in self.pending),
            plan_reason=self.plan.reason if self.plan is not None else "",
            file=cfg.file,
            file_present=self.state.present,
            key=cfg.annotation_key,
            value=cfg.annotation_value,
            seen=self.state.annotations.get(cfg.annotation_key),
            annotation_decides=self.annotation_decides,
            pod=self.environ.get("HOSTNAME", ""),
            pod_namespace=self.environ.get("POD_NAMESPACE", ""),
            controller_namespace=cfg.controller_namespace,
        )

    # --- the loop ------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Exit code; raises nothing but Failure (handled by the caller) and KeyboardInterrupt."""
        cfg = self.config
        self.state = read_file(cfg.file)
        if not self.state.present:
            self.log(f"annotations file {cfg.file} is missing: using flag and built-in defaults")
        spec = resolve_spec(cfg, self.state.annotations, self.euid, self.egid)
        plan = plan_probe(spec, self.euid, self.egid, self.global_ipv6())
        self.plan = plan
        self.debug(f"spec {spec.describe()}")
        self.probes = [self.make_probe(target, plan) for target in plan.targets]
        for probe in self.probes:
            self.log(f"probe: {probe.describe()}")
        if not self.probes:
            if cfg.require_probe:
                raise Failure(exitcodes.PROBE_UNAVAILABLE, f"no probe can prove capture: {plan.reason}")
            if plan.captures and not cfg.trust_annotation:
                raise Failure(
                    exitcodes.PROBE_UNAVAILABLE,
                    f"no probe can prove capture: {plan.reason}; this pod's spec captures traffic, so "
                    "the status annotation alone is not proof (anyone who may patch the pod can set it): "
                    "fix the pod, or pass --trust-annotation to accept it",
                )
            self.log(f"no probe can prove capture for this pod: {plan.reason}")
            self.log(f"falling back to the annotation {cfg.annotation_key}={cfg.annotation_value!r}")
        self.annotation_decides = cfg.trust_annotation or not self.probes
        try:
            return self._loop()
        finally:
            for probe in self.probes:
                probe.close()

    def _annotation_ok(self) -> bool:
        return self.state.annotations.get(self.config.annotation_key) == self.config.annotation_value

    def _loop(self) -> int:
        cfg = self.config
        deadline = self.started + cfg.timeout
        self.pending = list(self.probes)
        last_read = self.clock()
        next_beat = self.started + cfg.heartbeat if cfg.heartbeat > 0 else float("inf")
        warned_untrusted = False
        first_attempt: float | None = None
        while True:
            if self._annotation_ok():
                if self.annotation_decides:
                    why = "--trust-annotation" if cfg.trust_annotation else "no probe applies"
                    self.log(
                        f"annotation {cfg.annotation_key}={cfg.annotation_value!r} present ({why}): done"
                    )
                    return exitcodes.CAPTURED
                if not warned_untrusted:
                    warned_untrusted = True
                    self.log(
                        f"annotation {cfg.annotation_key}={cfg.annotation_value!r} present but not "
                        "trusted on its own (anyone who may patch the pod can set it; pass "
                        "--trust-annotation to accept it); waiting for the probe"
                    )
            for probe in list(self.pending):
                if first_attempt is None:
                    first_attempt = self.clock()
                    self.debug(f"first probe attempt at monotonic={time.monotonic():.6f}")
                outcome = probe.attempt()
                self.attempts += 1
                self._record(probe.label, outcome)
                if outcome.ok:
                    self.pending.remove(probe)
            if self.probes and not self.pending:
                self.log(f"traffic capture confirmed after {self.attempts} attempt(s): done")
                return exitcodes.CAPTURED
            now = self.clock()
            if now >= deadline:
                self.err.write(timeout_message(self.snapshot()) + "\n")
                self.err.flush()
                return exitcodes.TIMEOUT
            if now >= next_beat:
                next_beat = now + cfg.heartbeat
                self.log(heartbeat_line(self.snapshot()))
            if self.annotation_decides and now - last_read >= cfg.delay:
                last_read = now
                self.state = self._reread(self.state)
                if self._annotation_ok():
                    continue
            if self.pending:
                waited = now - (first_attempt if first_attempt is not None else self.started)
                pause = next_interval(waited)
            else:
                pause = max(MIN_INTERVAL, last_read + cfg.delay - now)
            self.sleep(max(0.0, min(pause, deadline - now, max(MIN_INTERVAL, next_beat - now))))

    def _reread(self, state: FileState) -> FileState:
        try:
            fresh = read_file(self.config.file)
        except Failure as exc:
            if self.annotation_note != exc.message:
                self.annotation_note = exc.message
                self.log(f"{exc.message} (keeping the last good contents)")
            return state
        if fresh.present != state.present:
            self.log(f"annotations file {self.config.file} {'appeared' if fresh.present else 'disappeared'}")
        return fresh

    def _record(self, label: str, outcome: Outcome) -> None:
        self.last_detail[label] = outcome.detail
        if self.last_state.get(label) != outcome.state:
            self.last_state[label] = outcome.state
            self.log(f"probe {outcome.detail}")


def _family_probe(target: ProbeTarget, plan: ProbePlan) -> Probe:
    if target.path is Path.BLOCKED:
        return BlockedProbe(target)
    return FamilyProbe(target, tproxy=plan.tproxy)


def run(config: Config, err: TextIO | None = None) -> int:
    """Run the waiter and map every outcome to an exit code; one line on stderr per failure, no traceback."""
    stream = err if err is not None else sys.stderr
    try:
        return Waiter(config, err=stream).run()
    except Failure as exc:
        stream.write(f"waiter: {exc.message}\n")
        return exc.code
    except KeyboardInterrupt:
        stream.write("waiter: interrupted\n")
        return exitcodes.INTERRUPTED
    except Exception as exc:
        stream.write(f"waiter: internal error: {type(exc).__name__}: {exc}\n")
        return exitcodes.INTERNAL


__all__: Sequence[str] = (
    "Config", "Failure", "Snapshot", "Waiter", "heartbeat_line", "next_interval", "read_file", "resolve_spec",
    "run", "timeout_message",
)  # fmt: skip
