"""What to do with one pod, decided from facts alone: no I/O, no clock, no API (tested without root).

Inputs are the pod's typed view, the selection verdict, the spec (or why it was refused) and what this
process remembers having put in place (`Applied`: the spec digest, the sandbox's namespace identity and
the pod IPs and containers it was applied for). The output is one Action the executor performs.

"Rules in place" belongs to a sandbox, not to a pod: a marked pod that lost an IP its rules were applied
for has a new sandbox (the IP is the sandbox's), and one that lost a container it had may have one (a
container restart keeps the sandbox, a sandbox restart starts every container again), which only the node
can tell: the executor then checks whether the pod's processes still live in the pinned namespace. An IP
that arrives after the capture is checked the same way (the pinned namespace must hold it) and then
recorded, so any later change of IP is known as a new sandbox. New containers alone (the app starting
after the init containers) are the pod's normal course.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..dataplane.netns import NetnsId
from ..errors import SpecError
from ..settings.spec import InterceptSpec, IPv6Policy
from . import events as ev
from . import selection
from .view import PodView


class MarkReason(StrEnum):
    """Why capture rules were (re)applied to a pod; the value is the Normal Event's reason."""

    INITIALIZED = ev.INITIALIZED
    RECONFIGURED = ev.RECONFIGURED
    REPAIRED = ev.REPAIRED
    REINITIALIZED = ev.REINITIALIZED


@dataclass(frozen=True, slots=True)
class Applied:
    """What this process last put in place in a pod, and for which sandbox."""

    digest: str
    netns: NetnsId
    ips: tuple[str, ...]
    container_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Known:
    """This process's memory of the pod."""

    applied: Applied | None = None
    awaiting_echo: bool = False
    """Our own mark was patched and the watch has not delivered it yet."""
    sandbox_lost: bool = False
    """The sandbox the rules were applied to was found dead, and its successor is not captured yet."""


@dataclass(frozen=True, slots=True)
class Notice:
    """A Warning to record: reason and our own sentence."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Skip:
    reason: str
    release: bool = False
    """The pod is finished or being deleted: let go of its sandbox (its pin) now."""


@dataclass(frozen=True, slots=True)
class Warn:
    """Not selected, but something the pod's owner should know."""

    reason: str
    notices: tuple[Notice, ...]


@dataclass(frozen=True, slots=True)
class Invalid:
    error: SpecError
    kept: bool
    """The pod is marked: the rules installed before stay as they are."""

    @property
    def message(self) -> str:
        then = (
            "the capture rules installed before are kept unchanged"
            if self.kept
            else "capture rules not installed"
        )
        return f"{ev.public_text(self.error)}; {then} (fail closed)"


@dataclass(frozen=True, slots=True)
class Verify:
    """Check the rules of a marked pod (in its sandbox, which is first checked to be alive)."""

    spec: InterceptSpec
    digest: str
    reason: str


@dataclass(frozen=True, slots=True)
class Apply:
    spec: InterceptSpec
    why: MarkReason
    reason: str


Action = Skip | Warn | Invalid | Verify | Apply
VERIFY_REQUESTED = "periodic drift check"
NO_RECORD = "marked, but this process has not checked this sandbox yet"
CONTAINERS_CHANGED = "a container was replaced: is it still the same sandbox?"
IPS_CHANGED = "pod IPs changed: a new sandbox"
IPS_ADDED = "an IP arrived after the capture: does the sandbox hold it?"
SANDBOX_LOST = "the sandbox the rules were applied to is gone: capture its successor"
IN_PLACE = "rules in place for this sandbox"
STALE_COPY = "a copy older than our own mark"


def candidate_digests(spec: InterceptSpec) -> set[str]:
    """Digests an application of `spec` can record: IPv6 `auto` resolves to capture or block per pod."""
    if spec.ipv6 is IPv6Policy.AUTO:
        return {spec.with_ipv6(True).fingerprint(), spec.with_ipv6(False).fingerprint()}
    return {spec.fingerprint()}


def _not_selected(pod: PodView, verdict: selection.Decision, wants_mesh: bool) -> Action:
    notices = []
    if pod.marked and verdict.reason not in (selection.DELETING, selection.FINISHED):
        # Fail closed: an annotation or label edit never removes capture from a running pod.
        notices.append(
            Notice(
                ev.CAPTURE_KEPT,
                f"pod no longer selected ({verdict.reason}) after its capture rules were installed; "
                "the rules are kept (only deleting the pod removes them)",
            )
        )
    if verdict.reason == selection.HOST_NETWORK and wants_mesh:
        notices.append(
            Notice(
                ev.HOST_NETWORK_SKIPPED,
                "hostNetwork pod asks for mesh capture; the node's own network is never changed, so this "
                "pod gets no capture rules",
            )
        )
    if notices:
        return Warn(verdict.reason, tuple(notices))
    return Skip(
        f"not selected: {verdict.reason}", release=verdict.reason in (selection.DELETING, selection.FINISHED)
    )


def decide(
    pod: PodView,
    verdict: selection.Decision,
    spec: InterceptSpec | SpecError,
    known: Known,
    *,
    verify: bool = False,
    wants_mesh: bool = False,
) -> Action:
    """The one action for this pass. `wants_mesh`: the pod would be selected were it not hostNetwork."""
    if known.awaiting_echo and not pod.marked:
        return Skip(STALE_COPY)  # the echo of our patch queues the pod again
    if not verdict.selected:
        return _not_selected(pod, verdict, wants_mesh)
    if isinstance(spec, SpecError):
        return Invalid(spec, kept=pod.marked)
    if not pod.marked:
        return Apply(spec, MarkReason.INITIALIZED, "not marked")
    digest = pod.digest or ""
    if digest not in candidate_digests(spec):
        return Apply(spec, MarkReason.RECONFIGURED, "interception annotations changed")
    applied = known.applied
    if known.sandbox_lost:
        return Apply(spec, MarkReason.REINITIALIZED, SANDBOX_LOST)
    if applied is None or applied.digest != digest:
        return Verify(spec, digest, NO_RECORD)
    if pod.ips and set(applied.ips) - set(pod.ips):
        return Apply(spec, MarkReason.REINITIALIZED, IPS_CHANGED)
    if set(pod.ips) - set(applied.ips):
        return Verify(spec, digest, IPS_ADDED)
    if set(applied.container_ids) - set(pod.container_ids):
        return Verify(spec, digest, CONTAINERS_CHANGED)
    if verify:
        return Verify(spec, digest, VERIFY_REQUESTED)
    return Skip(IN_PLACE)
