"""The reconcile decision as a pure function: every branch from facts alone, no root, no API, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from istio_pod_network_controller.controller import events as ev
from istio_pod_network_controller.controller import selection
from istio_pod_network_controller.controller.cache import slim_pod
from istio_pod_network_controller.controller.decision import (
    IPS_ADDED,
    Applied,
    Apply,
    Invalid,
    Known,
    MarkReason,
    Notice,
    Skip,
    Verify,
    Warn,
    decide,
)
from istio_pod_network_controller.controller.view import PodView
from istio_pod_network_controller.dataplane.netns import NetnsId
from istio_pod_network_controller.errors import SpecError
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import InterceptSpec, IPv6Policy

SPEC = InterceptSpec(ipv6=IPv6Policy.BLOCK)
DIGEST = SPEC.fingerprint()
SELECTED = selection.Decision(True, selection.INJECTED)
SANDBOX = NetnsId(4, 4026532001)
CIDS = ("containerd://" + "a" * 64, "containerd://" + "b" * 64)


def view(*, marked: bool = True, digest: str = DIGEST, ips: tuple[str, ...] = ("10.1.0.5",),
         cids: tuple[str, ...] = CIDS) -> PodView:  # fmt: skip
    notes = {ann.STATUS: ann.STATUS_INITIALIZED, ann.SPEC_DIGEST: digest} if marked else {}
    raw: dict[str, Any] = {
        "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "resourceVersion": "7",
                     "annotations": notes},
        "status": {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips],
                   "containerStatuses": [{"containerID": c} for c in cids]},
    }  # fmt: skip
    return PodView.of(slim_pod(raw))


APPLIED = Known(Applied(DIGEST, SANDBOX, ("10.1.0.5",), CIDS))


def test_view_reads_the_cache_once_into_typed_fields() -> None:
    pod = view(ips=("fd00::5", "10.1.0.5"))
    assert (pod.uid, pod.name, pod.namespace, pod.resource_version) == ("u-1", "web", "shop", "7")
    assert pod.ips == ("fd00::5", "10.1.0.5") and pod.container_ids == CIDS
    assert pod.marked and pod.digest == DIGEST
    with pytest.raises(TypeError):
        pod.annotations[ann.STATUS] = "x"  # type: ignore[index]
    assert not view(marked=False).marked


def test_unmarked_selected_pod_is_applied_as_initialized() -> None:
    assert decide(view(marked=False), SELECTED, SPEC, Known()) == Apply(
        SPEC, MarkReason.INITIALIZED, "not marked"
    )


def test_a_copy_older_than_our_mark_is_skipped() -> None:
    assert isinstance(decide(view(marked=False), SELECTED, SPEC, Known(awaiting_echo=True)), Skip)
    # the echo itself (marked) goes on
    assert decide(view(), SELECTED, SPEC, Known(APPLIED.applied, awaiting_echo=True)) == Skip(
        "rules in place for this sandbox"
    )


def test_marked_pod_in_place_is_skipped_or_verified_on_request() -> None:
    assert decide(view(), SELECTED, SPEC, APPLIED) == Skip("rules in place for this sandbox")
    assert isinstance(decide(view(), SELECTED, SPEC, APPLIED, verify=True), Verify)


def test_marked_pod_unknown_to_this_process_is_verified() -> None:
    action = decide(view(), SELECTED, SPEC, Known())
    assert isinstance(action, Verify) and action.digest == DIGEST
    other = Known(Applied("0" * 16, SANDBOX, ("10.1.0.5",), CIDS))
    assert isinstance(decide(view(), SELECTED, SPEC, other), Verify)


def test_changed_spec_is_reconfigured() -> None:
    action = decide(view(digest="0" * 16), SELECTED, SPEC, APPLIED)
    assert isinstance(action, Apply) and action.why is MarkReason.RECONFIGURED


def test_a_lost_pod_ip_means_a_new_sandbox() -> None:
    action = decide(view(ips=("10.1.0.9",)), SELECTED, SPEC, APPLIED)
    assert isinstance(action, Apply) and action.why is MarkReason.REINITIALIZED
    # an IP added next to the old one (dual stack coming up) is checked on the node, not assumed new
    added = decide(view(ips=("10.1.0.5", "fd00::5")), SELECTED, SPEC, APPLIED)
    assert isinstance(added, Verify) and added.reason == IPS_ADDED
    # no IP reported (the kubelet between sandboxes) decides nothing on its own
    assert isinstance(decide(view(ips=()), SELECTED, SPEC, APPLIED), Skip)


def test_an_ip_that_arrives_after_the_capture_is_checked_then_any_change_is_a_new_sandbox() -> None:
    """A capture recorded without an IP (the pod IP came later) must not take a new IP for "in place"."""
    before_ip = Known(Applied(DIGEST, SANDBOX, (), CIDS))
    action = decide(view(ips=("10.1.0.7",)), SELECTED, SPEC, before_ip)
    assert isinstance(action, Verify) and action.reason == IPS_ADDED
    recorded = Known(Applied(DIGEST, SANDBOX, ("10.1.0.7",), CIDS))
    assert isinstance(decide(view(ips=("10.1.0.7",)), SELECTED, SPEC, recorded), Skip)
    moved = decide(view(ips=("10.1.0.8",)), SELECTED, SPEC, recorded)
    assert isinstance(moved, Apply) and moved.why is MarkReason.REINITIALIZED


def test_a_replaced_container_asks_the_node_whether_the_sandbox_is_the_same() -> None:
    replaced = (CIDS[0], "containerd://" + "c" * 64)
    action = decide(view(cids=replaced), SELECTED, SPEC, APPLIED)
    assert isinstance(action, Verify) and "replaced" in action.reason
    # the app starting after the init containers only adds IDs: the pod's normal course
    assert isinstance(decide(view(cids=(*CIDS, "containerd://" + "d" * 64)), SELECTED, SPEC, APPLIED), Skip)


def test_invalid_spec_names_the_input_and_says_what_is_kept() -> None:
    error = SpecError("annotation " + ann.INCLUDE_INBOUND_PORTS, "80,99999", "port out of range")
    fresh = decide(view(marked=False), SELECTED, error, Known())
    kept = decide(view(), SELECTED, error, APPLIED)
    assert isinstance(fresh, Invalid) and isinstance(kept, Invalid)
    assert ann.INCLUDE_INBOUND_PORTS in fresh.message and "not installed" in fresh.message
    assert "kept unchanged" in kept.message


def test_not_selected_pods_skip_or_warn() -> None:
    plain = selection.Decision(False, selection.NOT_MESH)
    assert decide(view(marked=False), plain, SPEC, Known()) == Skip("not selected: not-selected")
    kept = decide(view(), selection.Decision(False, selection.INJECT_DISABLED), SPEC, APPLIED)
    assert isinstance(kept, Warn) and [n.reason for n in kept.notices] == [ev.CAPTURE_KEPT]
    # deleting or finished pods lose nothing worth a warning, and their sandbox is let go
    for reason in (selection.DELETING, selection.FINISHED):
        assert decide(view(), selection.Decision(False, reason), SPEC, APPLIED) == Skip(
            f"not selected: {reason}", release=True
        )
    host = selection.Decision(False, selection.HOST_NETWORK)
    warned = decide(view(marked=False), host, SPEC, Known(), wants_mesh=True)
    assert isinstance(warned, Warn) and warned.notices[0].reason == ev.HOST_NETWORK_SKIPPED
    assert isinstance(decide(view(marked=False), host, SPEC, Known(), wants_mesh=False), Skip)
    assert all(isinstance(n, Notice) and n.message for n in kept.notices + warned.notices)


def test_mark_reasons_are_the_event_reasons() -> None:
    assert [m.value for m in MarkReason] == [ev.INITIALIZED, ev.RECONFIGURED, ev.REPAIRED, ev.REINITIALIZED]


def test_a_lost_sandbox_is_reinitialized_whatever_the_update_says() -> None:
    lost = Known(None, sandbox_lost=True)
    for pod in (view(), view(ips=("10.1.0.9",)), view(cids=())):
        action = decide(pod, SELECTED, SPEC, lost)
        assert isinstance(action, Apply) and action.why is MarkReason.REINITIALIZED
    # a changed spec still says so (the new sandbox gets the new spec either way)
    changed = decide(view(digest="0" * 16), SELECTED, SPEC, lost)
    assert isinstance(changed, Apply) and changed.why is MarkReason.RECONFIGURED
