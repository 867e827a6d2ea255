"""The exact Kubernetes API access the controller needs: one list, shared by the chart test and the RBAC test.

The chart's ClusterRole (chart/istio-pod-network-controller/templates/rbac.yaml) must render to exactly these
rules; tests/install compares them, and the controller's own RBAC test checks it works with nothing more.
RBAC cannot say "pods of this node" or "only these annotations": the chart's ValidatingAdmissionPolicies
(templates/node-restriction.yaml, docs/install.md) narrow `patch pods` and `create events` to that.
"""

from __future__ import annotations

from typing import Final

CLUSTER_ROLE_RULES: Final[tuple[dict[str, list[str]], ...]] = (
    # Watch mesh pods on this node (field selector spec.nodeName), read them, mark them (status annotation).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    # Namespace-level selection: the 2018 `istio-pod-network-controller/initialize` annotation and exclusions.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    # Its own Node, read once at start: a --node-name that names no Node is warned about, not silently idle.
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    # Events on pods: "capture installed", "rules repaired", "spec rejected". Create only: a repeated Warning
    # has a deterministic name and is refused as AlreadyExists, never patched.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
)


def cluster_role_rules() -> list[dict[str, list[str]]]:
    """A fresh, mutable copy of CLUSTER_ROLE_RULES (lists compare equal to rendered YAML)."""
    return [{key: list(value) for key, value in rule.items()} for rule in CLUSTER_ROLE_RULES]
