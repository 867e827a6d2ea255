"""The waiting loop: probe fast, fall back to the status annotation only where allowed, time out helpfully.

Decision rules (docs/waiter.md):
- A probe applies: exit 0 once every family to probe has been proven; the status annotation alone is
  accepted only with --trust-annotation (a forged annotation must not open the pod).
- No probe applies (inbound capture off, mode NONE, waiter not the proxy uid, ...): say why and accept the
  status annotation (or, with --require-probe, refuse at once).
Probe attempts: the first immediately, then every max(10 ms, min(500 ms, waited/8)); the annotations file is
re-read at most every --delay seconds and only when the annotation can decide.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from ..errors import DownwardAPIError, SpecError
from ..settings import annotations as ann
from ..settings.downward import MAX_FILE_BYTES, parse_annotations
from ..settings.spec import InterceptSpec, build_spec
from . import exitcodes
from .probe import FamilyProbe, Outcome, has_global_ipv6
from .probeplan import ProbePlan, plan_probe

DEFAULT_FILE = "/etc/podinfo/pod_annotations"
MIN_INTERVAL = 0.010
MAX_INTERVAL = 0.500
BACKOFF_FRACTION = 0.125
CONTROLLER_NAMESPACE = "istio-pod-network-controller"


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
    defaults: Mapping[str, str] = field(default_factory=dict)
    """Controller-default settings (Setting.name -> raw text) from flags/environment."""
    default_source: Callable[[str], str] = lambda name: "--" + name.replace("_", "-")


class Failure(Exception):
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


def resolve_spec(config: Config, annotations: Mapping[str, str]) -> InterceptSpec:
    """Flags first on their own (a bad flag is a usage error), then the pod's annotations on top."""
    try:
        build_spec({}, config.defaults, config.default_source)
    except SpecError as exc:
        raise Failure(exitcodes.USAGE, f"invalid setting: {exc}") from None
    try:
        return build_spec(annotations, config.defaults, config.default_source)
    except SpecError as exc:
        raise Failure(
            exitcodes.BAD_ANNOTATION,
            f"{exc}; the controller refuses such a pod, so its traffic will never be captured: fix the "
            "annotation and recreate the pod",
        ) from None


class Waiter:
    def __init__(
        self,
        config: Config,
        *,
        err: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        euid: int | None = None,
        global_ipv6: Callable[[], bool] = has_global_ipv6,
        make_probe: Callable[[int, ProbePlan], Probe] | None = None,
    ) -> None:
        self.config = config
        self.err = err if err is not None else sys.stderr
        self.clock = clock
        self.sleep = sleep
        self.started = clock()
        self.euid = os.geteuid() if euid is None else euid
        self.global_ipv6 = global_ipv6
        self.make_probe = make_probe or _family_probe
        self.last_state: dict[str, str] = {}
        self.last_detail: dict[str, str] = {}
        self.attempts = 0
        self.annotation_note = ""
        self.plan: ProbePlan | None = None

    # --- output --------------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        self.err.write(f"waiter +{self.clock() - self.started:.3f}s: {message}\n")
        self.err.flush()

    def debug(self, message: str) -> None:
        if self.config.verbose:
            self.log(f"debug: {message}")

    # --- the loop ------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Exit code; raises nothing but Failure (handled by the caller) and KeyboardInterrupt."""
        cfg = self.config
        state = read_file(cfg.file)
        if not state.present:
            self.log(f"annotations file {cfg.file} is missing: using flag and built-in defaults")
        spec = resolve_spec(cfg, state.annotations)
        plan = plan_probe(spec, self.euid, self.global_ipv6())
        self.plan = plan
        self.debug(f"spec {spec.describe()}")
        probes = [self.make_probe(family, plan) for family in plan.families]
        if probes:
            for probe in probes:
                self.log(f"probe: {probe.describe()}")
        else:
            if cfg.require_probe:
                raise Failure(exitcodes.PROBE_UNAVAILABLE, f"no probe can prove capture: {plan.reason}")
            self.log(f"no probe can prove capture for this pod: {plan.reason}")
            self.log(f"falling back to the annotation {cfg.annotation_key}={cfg.annotation_value!r}")
        annotation_decides = cfg.trust_annotation or not probes
        try:
            return self._loop(probes, state, annotation_decides)
        finally:
            for probe in probes:
                probe.close()

    def _annotation_ok(self, state: FileState) -> bool:
        return state.annotations.get(self.config.annotation_key) == self.config.annotation_value

    def _loop(self, probes: list[Probe], state: FileState, annotation_decides: bool) -> int:
        cfg = self.config
        deadline = self.started + cfg.timeout
        pending = list(probes)
        proven: list[str] = []
        last_read = self.clock()
        warned_untrusted = False
        first_attempt: float | None = None
        while True:
            if self._annotation_ok(state):
                if annotation_decides:
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
            for probe in list(pending):
                if first_attempt is None:
                    first_attempt = self.clock()
                    self.debug(f"first probe attempt at monotonic={time.monotonic():.6f}")
                outcome = probe.attempt()
                self.attempts += 1
                self._record(probe.label, outcome)
                if outcome.ok:
                    pending.remove(probe)
                    proven.append(outcome.detail)
            if probes and not pending:
                self.log(f"traffic capture confirmed after {self.attempts} attempt(s): done")
                return exitcodes.CAPTURED
            now = self.clock()
            if now >= deadline:
                self.err.write(self.timeout_message(state) + "\n")
                self.err.flush()
                return exitcodes.TIMEOUT
            if annotation_decides and now - last_read >= cfg.delay:
                last_read = now
                state = self._reread(state)
                if self._annotation_ok(state):
                    continue
            if pending:
                waited = now - (first_attempt if first_attempt is not None else self.started)
                pause = next_interval(waited)
            else:
                pause = max(MIN_INTERVAL, last_read + cfg.delay - now)
            self.sleep(max(0.0, min(pause, deadline - now)))

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

    def timeout_message(self, state: FileState) -> str:
        cfg = self.config
        key, value = cfg.annotation_key, cfg.annotation_value
        pod = os.environ.get("HOSTNAME") or "<this pod>"
        ns_flag = f" -n {os.environ['POD_NAMESPACE']}" if os.environ.get("POD_NAMESPACE") else ""
        lines = [f"waiter: timed out after {cfg.timeout:g}s: this pod's traffic capture is not confirmed"]
        if self.last_detail:
            for detail in self.last_detail.values():
                lines.append(f"  last probe ({self.attempts} attempts): {detail}")
        elif self.plan is not None:
            lines.append(f"  no probe applies: {self.plan.reason}")
        seen = state.annotations.get(key)
        if not state.present:
            ann_text = f"file {cfg.file} is missing"
        elif seen is None:
            ann_text = f"absent from {cfg.file}"
        else:
            ann_text = f"{seen!r}"
        if cfg.trust_annotation or not self.last_detail:
            verdict = "accepted as proof once present"
        elif seen == value:
            verdict = "present, but the probe shows no capture: forged, or the rules were removed since"
        else:
            verdict = "not accepted on its own without --trust-annotation"
        lines += [
            f"  annotation {key}: {ann_text} (wanted {value!r}; {verdict})",
            "  check:",
            f"  - is the controller running on this node? kubectl -n {CONTROLLER_NAMESPACE} get pods -o wide "
            "(one Ready pod on this pod's NODE)",
            "  - does this pod match the controller's selection rules (e.g. the 2018 "
            f'{ann.LEGACY_INITIALIZE}="true" on the pod or its namespace, or sidecar injection)?',
            f"  - the pod's Events: kubectl{ns_flag} describe pod {pod} (refusals are reported there)",
            f"  - the controller's log on this node: kubectl -n {CONTROLLER_NAMESPACE} logs <controller pod>",
        ]
        return "\n".join(lines)


def _family_probe(family: int, plan: ProbePlan) -> Probe:
    return FamilyProbe(family, plan.inbound_port, plan.outbound_port, plan.target_port, tproxy=plan.tproxy)


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


__all__: Sequence[str] = ("Config", "Failure", "Waiter", "next_interval", "read_file", "resolve_spec", "run")
