"""Which pods on this node get capture rules: a pure function of the pod, its namespace and the options.

Kept free of I/O so every rule can be tested exhaustively and the reason for each decision can be logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..settings import annotations as ann

Obj = Mapping[str, Any]

# Reasons (stable strings: they appear in logs and metrics labels).
HOST_NETWORK: Final = "host-network"
DELETING: Final = "deleting"
FINISHED: Final = "finished"
EXCLUDED_NAMESPACE: Final = "excluded-namespace"
OPENSHIFT_DEPLOYER: Final = "openshift-deployer"
OPENSHIFT_BUILD: Final = "openshift-build"
INTERCEPTION_NONE: Final = "interception-mode-none"
LEGACY_ANNOTATION: Final = "legacy-initialize-annotation"
LEGACY_NAMESPACE: Final = "legacy-initialize-namespace-annotation"
LEGACY_OPT_OUT: Final = "legacy-initialize-false"
INJECTED: Final = "injected-sidecar-with-waiter"
ISTIO_CNI_MODE: Final = "injected-istio-cni-mode"
"""Stock Istio with its CNI option on: istio-validation instead of istio-init, settings as annotations."""
INJECT_DISABLED: Final = "sidecar-inject-false"
ISTIO_INIT_PRESENT: Final = "istio-init-present"
NO_WAITER: Final = "injected-without-waiter"
NOT_MESH: Final = "not-selected"


@dataclass(frozen=True, slots=True)
class SelectionOptions:
    legacy_annotation: bool = True
    injected: bool = True
    excluded_namespaces: frozenset[str] = field(default_factory=lambda: frozenset({"kube-system"}))
    istio_cni_mode: bool = True
    """Also select pods Istio injected in CNI mode (with `injected`): we play the missing CNI agent."""


@dataclass(frozen=True, slots=True)
class Decision:
    selected: bool
    reason: str


def _map(obj: Obj | None, *path: str) -> Mapping[str, Any]:
    for key in path:
        if not isinstance(obj, Mapping):
            return {}
        obj = obj.get(key)
    return obj if isinstance(obj, Mapping) else {}


def _init_container_names(pod: Obj) -> set[str]:
    containers = _map(pod, "spec").get("initContainers") or []
    return {c.get("name", "") for c in containers if isinstance(c, Mapping)}


def select(pod: Obj, namespace: Obj | None, options: SelectionOptions) -> Decision:
    """Decide for one pod. Exclusions come first, so no rule can select a pod an exclusion protects."""
    meta = _map(pod, "metadata")
    annotations = _map(pod, "metadata", "annotations")
    labels = _map(pod, "metadata", "labels")
    if _map(pod, "spec").get("hostNetwork"):
        return Decision(False, HOST_NETWORK)
    if meta.get("deletionTimestamp"):
        return Decision(False, DELETING)
    if _map(pod, "status").get("phase") in ("Succeeded", "Failed"):
        return Decision(False, FINISHED)
    if meta.get("namespace") in options.excluded_namespaces:
        return Decision(False, EXCLUDED_NAMESPACE)
    if ann.OPENSHIFT_DEPLOYER_LABEL in labels:
        return Decision(False, OPENSHIFT_DEPLOYER)
    if ann.OPENSHIFT_BUILD_ANNOTATION in annotations or ann.OPENSHIFT_BUILD_ANNOTATION in labels:
        return Decision(False, OPENSHIFT_BUILD)
    if str(annotations.get(ann.INTERCEPTION_MODE, "")).strip() == "NONE":
        return Decision(False, INTERCEPTION_NONE)

    if options.legacy_annotation:
        if ann.LEGACY_INITIALIZE in annotations:
            # The pod's own annotation decides, either way, before its namespace's.
            if annotations[ann.LEGACY_INITIALIZE] == "true":
                return Decision(True, LEGACY_ANNOTATION)
        elif _map(namespace, "metadata", "annotations").get(ann.LEGACY_INITIALIZE) == "true":
            return Decision(True, LEGACY_NAMESPACE)

    if options.injected and ann.SIDECAR_STATUS in annotations:
        inject = labels.get(ann.SIDECAR_INJECT, annotations.get(ann.SIDECAR_INJECT))
        if str(inject).strip().lower() == "false":
            return Decision(False, INJECT_DISABLED)
        inits = _init_container_names(pod)
        if ann.ISTIO_INIT_CONTAINER in inits:
            return Decision(False, ISTIO_INIT_PRESENT)
        if ann.WAITER_CONTAINER in inits:
            return Decision(True, INJECTED)
        if options.istio_cni_mode and ann.ISTIO_VALIDATION_CONTAINER in inits:
            return Decision(True, ISTIO_CNI_MODE)
        return Decision(False, NO_WAITER)

    if options.legacy_annotation and annotations.get(ann.LEGACY_INITIALIZE) not in (None, "true"):
        return Decision(False, LEGACY_OPT_OUT)
    return Decision(False, NOT_MESH)
