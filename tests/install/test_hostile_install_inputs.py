"""Issue 12 attack 1 through injection: `inject` and the webhook copy istio-init's arguments into pod
annotations, so a tenant who writes their own istio-init (`-x 'fe80::%lo -j RETURN\\n...'`) reaches the
controller through them. Property, for every istio-iptables flag we translate, in both spellings: the
rewrite refuses with our error, or the annotations it writes are refused by the controller's parser naming
one of them, or they load only the plan's rules (real tools, scratch namespaces). The waiter container we
add never carries a tenant's bytes. `make soak` runs 10,000 examples per setting (spelling, inline or
separate value, inject or webhook drawn per example).
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from install_helpers import injected_pod, istio_init

from hostile_values import IPTABLES_ATTACK, assert_loads_only_the_plan, assert_refusal_names, hostile
from istio_pod_network_controller.errors import SpecError
from istio_pod_network_controller.install.injection import InjectionError, InjectOptions, rewrite_pod
from istio_pod_network_controller.install.webhook.server import parse_review, review_response
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.istio import ISTIO_IPTABLES_FLAGS
from istio_pod_network_controller.settings.spec import SETTINGS_BY_NAME, build_spec

OPTIONS = InjectOptions()
BASE_POD = injected_pod()
SPELLINGS: dict[str, list[str]] = {}
for _flag in ISTIO_IPTABLES_FLAGS:
    if _flag.setting is not None and not _flag.boolean:
        SPELLINGS.setdefault(_flag.setting, []).append("--" + _flag.long)
        SPELLINGS[_flag.setting] += ["-" + _flag.short] if _flag.short else []
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _pod_with(flag: str, value: str, inline: bool) -> dict[str, Any]:
    pod = copy.deepcopy(BASE_POD)
    init = istio_init(pod["spec"])
    init["args"] = [*init.get("args", []), *([f"{flag}={value}"] if inline else [flag, value])]
    return pod


def _check_annotations(before: dict[str, Any], after: dict[str, Any]) -> None:
    """The controller's view of the rewritten pod: a refusal naming a written annotation, or plan rules."""
    written = {k: v for k, v in after.items() if before.get(k) != v}
    try:
        spec = build_spec(after)
    except SpecError as exc:
        refused: SpecError | None = exc
    else:
        refused = None
    if refused is None:
        assert_loads_only_the_plan(spec)
        return
    key = refused.source.removeprefix("annotation ")
    assert key in written, (refused.source, sorted(written))
    assert_refusal_names(refused, f"annotation {key}", after[key])


def _check_waiter(spec: dict[str, Any]) -> None:
    (waiter,) = [c for c in spec["initContainers"] if c["name"] == ann.WAITER_CONTAINER]
    for arg in waiter["args"]:
        assert arg.isprintable() and " " not in arg, arg


@pytest.mark.root
@pytest.mark.parametrize("setting", SPELLINGS, ids=SPELLINGS)
@SLOW
@given(data=st.data(), through=st.sampled_from(["inject", "webhook"]), inline=st.booleans())
def test_hostile_istio_init_argument_is_refused_or_loads_only_the_plan(
    setting: str, data: st.DataObject, through: str, inline: bool
) -> None:
    flag = data.draw(st.sampled_from(SPELLINGS[setting]))
    value = data.draw(hostile(SETTINGS_BY_NAME[setting].parse))
    pod = _pod_with(flag, value, inline)
    rewritten = _through_inject(pod) if through == "inject" else _through_webhook(pod)
    if rewritten is None:
        return
    _check_waiter(rewritten["spec"])
    _check_annotations(pod["metadata"].get("annotations", {}), rewritten["metadata"]["annotations"])


def _through_inject(pod: dict[str, Any]) -> dict[str, Any] | None:
    try:
        result = rewrite_pod(pod["metadata"], pod["spec"], OPTIONS)
    except InjectionError as exc:
        refusal = exc.public
    else:
        refusal = ""
    if refusal:
        assert refusal.isprintable()
        return None
    assert result.changed
    return {"metadata": result.metadata, "spec": result.spec}


def _through_webhook(pod: dict[str, Any]) -> dict[str, Any] | None:
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "f00d",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "default",
            "object": pod,
        },
    }
    answer = review_response(parse_review(json.dumps(review).encode()), OPTIONS)["response"]
    if not answer["allowed"]:
        assert answer["status"]["message"].isprintable()
        return None
    patch = json.loads(base64.b64decode(answer["patch"]))
    patched: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(pod), patch)
    return patched


def test_the_issue_attack_through_inject_is_refused_by_inject_itself() -> None:
    """inject parses istio-init's -x with the spec's own parser: the object is refused, naming the argument,
    with the value escaped; the controller would refuse the same value as an annotation."""
    pod = _pod_with("-x", IPTABLES_ATTACK, inline=False)
    with pytest.raises(InjectionError) as refused:
        rewrite_pod(pod["metadata"], pod["spec"], OPTIONS)
    assert "--istio-service-exclude-cidr" in str(refused.value)
    assert "\n" not in refused.value.public and "\n" not in str(refused.value)
    with pytest.raises(SpecError) as caught:
        build_spec({ann.EXCLUDE_OUTBOUND_IP_RANGES: IPTABLES_ATTACK.strip(), ann.IPV6: "capture"})
    assert caught.value.source == f"annotation {ann.EXCLUDE_OUTBOUND_IP_RANGES}"
    assert "\n" not in caught.value.public
