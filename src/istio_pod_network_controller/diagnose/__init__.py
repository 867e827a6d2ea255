"""Diagnosis from a workstation or a node: `status` explains one pod; `rules verify --pod` reads its spec."""

DEFAULT_CONTROLLER_NAMESPACE = "istio-system"
"""The chart's namespace (its 2018 `Namespace` value): where `status` and `rules verify --pod` look."""
