"""The chart's own objects for the simulated cluster, rendered by Helm's engine (helm-python-sdk).

The lab runs only from a checkout, so the chart is found beside it. What the emulator enforces is therefore
exactly what `helm install` ships, never a copy: the node-restriction ValidatingAdmissionPolicies.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import helm_python
import yaml

CHART = Path(__file__).resolve().parents[4] / "chart" / "istio-pod-network-controller"
NAMESPACE = "istio-system"
RELEASE = "istio-pod-network-controller"
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")


@functools.cache
def _rendered(values_yaml: str) -> tuple[dict[str, Any], ...]:
    if not (CHART / "Chart.yaml").is_file():
        raise FileNotFoundError(f"the chart is not at {CHART}: the lab runs from a checkout of the project")
    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(
            yaml.safe_load(values_yaml), name=RELEASE, namespace=NAMESPACE, is_install=True
        )
    objects = []
    for source, text in sorted(rendered.items()):
        if source.endswith(".txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict) and doc]
    return tuple(objects)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders with `values` (fresh copies)."""
    return copy.deepcopy(list(_rendered(yaml.safe_dump(values or {}, sort_keys=True))))


def policies(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's ValidatingAdmissionPolicies, then their bindings."""
    objects = render(values)
    return [o for kind in POLICY_KINDS for o in objects if o.get("kind") == kind]
