"""Property tests for hostile input to `inject` and the webhook: our own error or a clean answer, never a
crash. Realistic Istio-injected pods are damaged at random places (values swapped for junk of any JSON type),
and bodies of any shape are posted as AdmissionReviews. `make soak` runs 10,000 examples each.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import click
import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from install_helpers import injected_deployment, injected_pod

from istio_pod_network_controller.cli.inject import inject_stream
from istio_pod_network_controller.install.injection import (
    InjectionError,
    InjectOptions,
    rewrite_object,
    rewrite_pod,
)
from istio_pod_network_controller.install.webhook.server import BadReview, parse_review, review_response
from istio_pod_network_controller.settings import annotations as ann

OPTIONS = InjectOptions()
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


def _damage(obj: dict[str, Any], edits: list[tuple[int, Any]]) -> dict[str, Any]:
    damaged = copy.deepcopy(obj)
    for position, junk in edits:
        paths = [p for p in _paths(damaged) if p]
        path = paths[position % len(paths)]
        parent = damaged
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = junk
    return damaged


EDITS = st.lists(st.tuples(st.integers(0, 10_000), JUNK), min_size=1, max_size=4)


def _init_names(spec: dict[str, Any]) -> list[str]:
    return [c.get("name") for c in spec.get("initContainers") or [] if isinstance(c, dict)]


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(edits=EDITS)
def test_damaged_pods_are_rewritten_or_refused_with_our_error(edits: list[tuple[int, Any]]) -> None:
    pod = _damage(injected_pod(), edits)
    if not isinstance(pod.get("spec"), dict):
        return
    try:
        result = rewrite_pod(pod.get("metadata"), pod["spec"], OPTIONS)
    except InjectionError:
        return
    if result.changed:
        names = _init_names(result.spec)
        assert names[0] == ann.WAITER_CONTAINER
        assert ann.ISTIO_INIT_CONTAINER not in names
        again = rewrite_pod(result.metadata, result.spec, OPTIONS)
        assert not again.changed, "a second rewrite must change nothing"


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(edits=EDITS)
def test_damaged_workload_yaml_through_inject(edits: list[tuple[int, Any]]) -> None:
    import yaml

    deployment = _damage(injected_deployment(), edits)
    text = yaml.safe_dump(deployment, sort_keys=False)
    try:
        result = inject_stream(text, OPTIONS)
    except click.ClickException as exc:
        refused: click.ClickException | None = exc
    else:
        refused = None
    if refused is not None:
        assert refused.message.startswith("document 1:")
        return
    assert isinstance(yaml.safe_load(result.output), dict)
    assert result.changed in (0, 1)
    if result.changed == 0:
        assert result.output == text


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_body_is_a_bad_review_or_a_review(body: bytes) -> None:
    try:
        request = parse_review(body)
    except BadReview as exc:
        message = str(exc)
    else:
        message = ""
        assert isinstance(request.get("uid"), str)
    assert message or body.strip().startswith(b"{")


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(edits=EDITS, operation=st.sampled_from(["CREATE", "UPDATE", "DELETE", None, 7]))
def test_any_admission_request_gets_an_answer(edits: list[tuple[int, Any]], operation: Any) -> None:
    pod = injected_pod()
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "f00d",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": operation,
            "namespace": "default",
            "object": pod,
        },
    }
    damaged = _damage(review, edits)
    try:
        request = parse_review(json.dumps(damaged).encode())
    except BadReview:
        return
    answer = review_response(request, OPTIONS)["response"]
    assert answer["uid"] == str(request["uid"])
    assert isinstance(answer["allowed"], bool)
    if "patch" in answer:
        patch = json.loads(base64.b64decode(answer["patch"]))
        patched = jsonpatch.apply_patch(request["object"], patch)
        assert _init_names(patched["spec"])[0] == ann.WAITER_CONTAINER


def test_rewrite_object_ignores_non_workloads() -> None:
    for junk in (None, 3, "text", [], {"kind": "Service"}, {"kind": "Deployment", "spec": []}):
        assert rewrite_object(junk, OPTIONS) == (False, [])
