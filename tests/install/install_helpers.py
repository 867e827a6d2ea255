"""Helpers for the install tests: chart rendering with Helm's engine, Istio-injected workloads."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from manifests_tool import render_tool

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
KUBE_INJECT = FIXTURES / "kube-inject-bookinfo.yaml"
K8S_VERSION = "1.33"
"""A recent Kubernetes whose schemas kubernetes-validate ships (matchConditions, appArmorProfile are GA)."""


def render(
    values: dict[str, Any] | None = None, namespace: str = "istio-pod-network-controller"
) -> list[dict]:
    """Every object the chart renders with these values (like `helm template -n NAMESPACE`)."""
    tool = render_tool()
    rendered = tool.render_chart(values or {}, namespace=namespace, release="release-name")
    return [yaml.safe_load(body) for _source, body in tool.split_rendered(rendered)]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def injected_deployment() -> dict:
    docs = list(yaml.safe_load_all(KUBE_INJECT.read_text()))
    return copy.deepcopy(next(d for d in docs if d and d["kind"] == "Deployment"))


def injected_pod() -> dict:
    template = injected_deployment()["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": "details-v1-abc", "namespace": "bookinfo"},
        "spec": template["spec"],
    }


def istio_init(spec: dict) -> dict:
    return next(c for c in spec["initContainers"] if c["name"] == "istio-init")


def status_annotation(template: dict) -> dict:
    return json.loads(template["metadata"]["annotations"]["sidecar.istio.io/status"])
