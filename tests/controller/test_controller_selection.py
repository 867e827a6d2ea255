"""Selection is pure: every rule, its configuration switch and its precedence."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from istio_pod_network_controller.controller import selection as sel
from istio_pod_network_controller.controller.selection import Decision, SelectionOptions, select
from istio_pod_network_controller.settings import annotations as ann

OPTS = SelectionOptions()


def pod(
    *,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    inits: tuple[str, ...] = (),
    host_network: bool = False,
    phase: str = "Running",
    deleting: bool = False,
    namespace: str = "default",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "namespace": namespace, "uid": "u",
                            "annotations": annotations or {}, "labels": labels or {}}  # fmt: skip
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"hostNetwork": host_network, "initContainers": [{"name": n} for n in inits]},
        "status": {"phase": phase},
    }


def mesh(**kwargs: Any) -> dict[str, Any]:
    notes = {ann.SIDECAR_STATUS: "{}", **kwargs.pop("annotations", {})}
    return pod(annotations=notes, inits=kwargs.pop("inits", (ann.WAITER_CONTAINER,)), **kwargs)


def ns(**notes: str) -> dict[str, Any]:
    return {"metadata": {"name": "default", "annotations": notes}}


LEGACY = {ann.LEGACY_INITIALIZE: "true"}


def test_injected_pod_with_waiter_is_selected() -> None:
    assert select(mesh(), None, OPTS) == Decision(True, sel.INJECTED)


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        (mesh(host_network=True), sel.HOST_NETWORK),
        (mesh(deleting=True), sel.DELETING),
        (mesh(phase="Succeeded"), sel.FINISHED),
        (mesh(phase="Failed"), sel.FINISHED),
        (mesh(namespace="kube-system"), sel.EXCLUDED_NAMESPACE),
        (mesh(labels={ann.OPENSHIFT_DEPLOYER_LABEL: "x"}), sel.OPENSHIFT_DEPLOYER),
        (mesh(annotations={ann.OPENSHIFT_BUILD_ANNOTATION: "b"}), sel.OPENSHIFT_BUILD),
        (mesh(annotations={ann.INTERCEPTION_MODE: "NONE"}), sel.INTERCEPTION_NONE),
        (mesh(annotations={ann.SIDECAR_INJECT: "false"}), sel.INJECT_DISABLED),
        (mesh(labels={ann.SIDECAR_INJECT: "false"}), sel.INJECT_DISABLED),
        (mesh(inits=(ann.ISTIO_INIT_CONTAINER, ann.WAITER_CONTAINER)), sel.ISTIO_INIT_PRESENT),
        (mesh(inits=()), sel.NO_WAITER),
        (pod(), sel.NOT_MESH),
        (pod(inits=(ann.WAITER_CONTAINER,)), sel.NOT_MESH),
        (pod(annotations={ann.LEGACY_INITIALIZE: "false"}), sel.LEGACY_OPT_OUT),
    ],
)
def test_exclusions(candidate: dict[str, Any], reason: str) -> None:
    assert select(candidate, ns(**LEGACY) if reason == sel.LEGACY_OPT_OUT else None, OPTS) == Decision(
        False, reason
    )


def test_inject_label_wins_over_annotation() -> None:
    both = mesh(labels={ann.SIDECAR_INJECT: "true"}, annotations={ann.SIDECAR_INJECT: "false"})
    assert select(both, None, OPTS).selected
    both = mesh(labels={ann.SIDECAR_INJECT: "false"}, annotations={ann.SIDECAR_INJECT: "true"})
    assert select(both, None, OPTS) == Decision(False, sel.INJECT_DISABLED)


def test_legacy_annotation_on_pod_or_namespace() -> None:
    assert select(pod(annotations=LEGACY), None, OPTS) == Decision(True, sel.LEGACY_ANNOTATION)
    assert select(pod(), ns(**LEGACY), OPTS) == Decision(True, sel.LEGACY_NAMESPACE)
    assert select(pod(), ns(**{ann.LEGACY_INITIALIZE: "yes"}), OPTS) == Decision(False, sel.NOT_MESH)
    # The pod's own "false" beats its namespace's "true".
    opt_out = pod(annotations={ann.LEGACY_INITIALIZE: "false"})
    assert select(opt_out, ns(**LEGACY), OPTS) == Decision(False, sel.LEGACY_OPT_OUT)


def test_rules_can_be_switched_off() -> None:
    no_legacy = SelectionOptions(legacy_annotation=False)
    no_injected = SelectionOptions(injected=False)
    assert select(pod(annotations=LEGACY), ns(**LEGACY), no_legacy) == Decision(False, sel.NOT_MESH)
    assert select(mesh(), None, no_legacy).selected
    assert select(mesh(), None, no_injected) == Decision(False, sel.NOT_MESH)
    assert select(pod(annotations=LEGACY), None, no_injected).selected


def test_excluded_namespaces_are_configurable() -> None:
    opts = SelectionOptions(excluded_namespaces=frozenset({"default"}))
    assert select(mesh(), None, opts) == Decision(False, sel.EXCLUDED_NAMESPACE)
    assert select(mesh(namespace="kube-system"), None, opts).selected


def test_host_network_is_never_selected_whatever_else() -> None:
    """Exhaustive over the selecting inputs: hostNetwork always wins."""
    for notes, inits, namespace in itertools.product(
        [{}, LEGACY, {ann.SIDECAR_STATUS: "{}"}, {**LEGACY, ann.SIDECAR_STATUS: "{}"}],
        [(), (ann.WAITER_CONTAINER,)],
        [None, ns(**LEGACY)],
    ):
        decision = select(pod(annotations=notes, inits=inits, host_network=True), namespace, OPTS)
        assert decision == Decision(False, sel.HOST_NETWORK)


def test_malformed_objects_do_not_raise() -> None:
    assert not select({}, None, OPTS).selected
    assert not select({"metadata": None, "spec": None, "status": None}, {"metadata": None}, OPTS).selected
    assert not select({"spec": {"initContainers": [None, "x"]}, "metadata": {"annotations": {
        ann.SIDECAR_STATUS: "{}"}}}, None, OPTS).selected  # fmt: skip


def test_legacy_annotated_pod_also_injected_is_selected_by_legacy_rule() -> None:
    assert select(mesh(annotations=LEGACY), None, OPTS) == Decision(True, sel.LEGACY_ANNOTATION)
