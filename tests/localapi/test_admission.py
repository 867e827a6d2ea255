"""The emulator's ValidatingAdmissionPolicy semantics over HTTP, as clients see them (CEL engine: C++)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ipnc_lab.localapi import LocalAPIServer, load_users

from .conftest import Raw, pod_manifest

POLICIES = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"
BINDINGS = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings"
PODS = "/api/v1/namespaces/default/pods"


@pytest.fixture
async def raw(api: LocalAPIServer) -> AsyncIterator[Raw]:
    async with aiohttp.ClientSession() as session:
        yield Raw(api, session)


def policy(name: str, validations: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    rules = [
        {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE", "UPDATE"]}
    ]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {"matchConstraints": {"resourceRules": rules}, "validations": validations, **spec},
    }


def binding(name: str, actions: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": f"{name}-binding"},
        "spec": {"policyName": name, "validationActions": actions, **spec},
    }


async def install(raw: Raw, p: dict[str, Any], b: dict[str, Any]) -> None:
    for path, body in ((POLICIES, p), (BINDINGS, b)):
        status, created, _ = await raw.request("POST", path, body)
        assert status == 201, created


LABELLED = {
    "expression": "object.metadata.?labels.orValue({}).exists(k, k == 'team')",
    "message": "needs a team",
}


async def test_deny_with_message_reason_and_the_api_servers_wording(raw: Raw) -> None:
    forbid = {**LABELLED, "reason": "Forbidden"}
    await install(raw, policy("team", [forbid]), binding("team", ["Deny"]))
    status, body, _ = await raw.request("POST", PODS, pod_manifest("a"))
    assert status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == (
        "pods \"a\" is forbidden: ValidatingAdmissionPolicy 'team' with binding 'team-binding' "
        "denied request: needs a team"
    )
    assert (await raw.request("POST", PODS, pod_manifest("b", team="x")))[0] == 201


async def test_default_reason_is_invalid_and_message_defaults_to_the_expression(raw: Raw) -> None:
    await install(raw, policy("p", [{"expression": "object.metadata.name != 'bad'"}]), binding("p", ["Deny"]))
    status, body, _ = await raw.request("POST", PODS, pod_manifest("bad"))
    assert status == 422 and body["reason"] == "Invalid"
    assert body["message"].endswith("denied request: failed expression: object.metadata.name != 'bad'")


async def test_message_expression_with_fallback(raw: Raw) -> None:
    validations = [
        {"expression": "false", "message": "static", "messageExpression": "'pod ' + object.metadata.name"},
        {"expression": "false", "message": "static two", "messageExpression": "object.metadata.nope"},
    ]
    await install(raw, policy("m", validations[:1]), binding("m", ["Deny"]))
    assert (await raw.request("POST", PODS, pod_manifest("x")))[1]["message"].endswith(
        "denied request: pod x"
    )
    await install(raw, policy("n", validations[1:]), binding("n", ["Deny"]))
    await raw.request("DELETE", f"{BINDINGS}/m-binding")
    assert (await raw.request("POST", PODS, pod_manifest("y")))[1]["message"].endswith("request: static two")


async def test_operations_match_conditions_variables_and_old_object(raw: Raw) -> None:
    rules = [{"apiGroups": [""], "apiVersions": ["*"], "resources": ["pods"], "operations": ["UPDATE"]}]
    p = policy(
        "keep-image",
        [
            {
                "expression": "variables.image == oldObject.spec.containers[0].image",
                "message": "image is fixed",
            }
        ],
        matchConstraints={"resourceRules": rules},
        matchConditions=[{"name": "not-admin", "expression": "request.userInfo.username != 'admin'"}],
        variables=[{"name": "image", "expression": "object.spec.containers[0].image"}],
    )
    await install(raw, p, binding("keep-image", ["Deny"]))
    user = raw.api.add_user("dev", "dev-token", [{"verbs": ["*"], "resources": ["pods"]}])
    assert (await raw.request("POST", PODS, pod_manifest("p")))[0] == 201  # CREATE is not matched
    change = {"spec": {"containers": [{"name": "app", "image": "other"}]}}
    raw.headers = {"Authorization": f"Bearer {user.token}"}
    status, body, _ = await raw.request(
        "PATCH", f"{PODS}/p", change, content_type="application/merge-patch+json"
    )
    assert status == 422 and body["message"].endswith("image is fixed")
    raw.headers = {"Authorization": f"Bearer {raw.api.admin.token}"}  # matchCondition false: not evaluated
    assert (await raw.request("PATCH", f"{PODS}/p", change, content_type="application/merge-patch+json"))[
        0
    ] == 200


async def test_user_extra_of_a_node_bound_token_reaches_cel(raw: Raw) -> None:
    expr = "request.userInfo.extra[?'authentication.kubernetes.io/node-name'].orValue(['none'])[0] == 'n1'"
    await install(raw, policy("node", [{"expression": expr}]), binding("node", ["Deny"]))
    raw.api.add_user("n1", "t1", [{"verbs": ["*"], "resources": ["pods"]}],
                     extra={"authentication.kubernetes.io/node-name": ["n1"]})  # fmt: skip
    raw.api.add_user("n2", "t2", [{"verbs": ["*"], "resources": ["pods"]}])
    raw.headers = {"Authorization": "Bearer t1"}
    assert (await raw.request("POST", PODS, pod_manifest("ok")))[0] == 201
    raw.headers = {"Authorization": "Bearer t2"}
    assert (await raw.request("POST", PODS, pod_manifest("no")))[0] == 422


async def test_warn_and_audit_do_not_deny_and_warn_sends_a_warning(raw: Raw) -> None:
    await install(raw, policy("w", [LABELLED]), binding("w", ["Warn", "Audit"]))
    status, _, resp = await raw.request("POST", PODS, pod_manifest("a"))
    assert status == 201
    assert "needs a team" in resp.headers["Warning"]


async def test_failure_policy_on_errors(raw: Raw) -> None:
    broken = [{"expression": "object.spec.nope == 1"}]
    await install(raw, policy("fail", broken), binding("fail", ["Deny"]))
    status, body, _ = await raw.request("POST", PODS, pod_manifest("a"))
    assert status == 422 and "resulted in error" in body["message"]
    await raw.request("DELETE", f"{BINDINGS}/fail-binding")
    await install(raw, policy("ignore", broken, failurePolicy="Ignore"), binding("ignore", ["Deny"]))
    assert (await raw.request("POST", PODS, pod_manifest("b")))[0] == 201


async def test_binding_match_resources_narrow_the_policy(raw: Raw) -> None:
    await raw.request("POST", "/api/v1/namespaces", {"metadata": {"name": "prod", "labels": {"env": "prod"}}})
    selector = {"namespaceSelector": {"matchLabels": {"env": "prod"}}}
    await install(raw, policy("prod", [LABELLED]), binding("prod", ["Deny"], matchResources=selector))
    assert (await raw.request("POST", PODS, pod_manifest("free")))[0] == 201
    status, _, _ = await raw.request("POST", "/api/v1/namespaces/prod/pods", pod_manifest("held", "prod"))
    assert status == 422


async def test_a_policy_that_does_not_compile_or_needs_params_is_refused(raw: Raw) -> None:
    status, body, _ = await raw.request("POST", POLICIES, policy("bad", [{"expression": "object.("}]))
    assert status == 422 and "Syntax error" in body["message"]
    status, body, _ = await raw.request("POST", POLICIES, policy("fn", [{"expression": "nosuch(object)"}]))
    assert status == 422 and "undeclared reference" in body["message"]
    params = policy("params", [{"expression": "true"}], paramKind={"apiVersion": "v1", "kind": "ConfigMap"})
    assert (await raw.request("POST", POLICIES, params))[0] == 422
    assert (await raw.request("POST", BINDINGS, binding("x", ["Block"])))[0] == 422


async def test_a_binding_to_a_missing_policy_is_ignored(raw: Raw) -> None:
    assert (await raw.request("POST", BINDINGS, binding("ghost", ["Deny"])))[0] == 201
    assert (await raw.request("POST", PODS, pod_manifest("a")))[0] == 201


def test_the_rbac_file_gives_users_groups_and_extra() -> None:
    (user,) = load_users(
        {
            "users": [
                {
                    "name": "n",
                    "token": "t",
                    "groups": ["g"],
                    "extra": {"authentication.kubernetes.io/node-name": ["a"]},
                }
            ]
        }
    )
    assert user.groups == ("g",) and user.extra == {"authentication.kubernetes.io/node-name": ("a",)}
    with pytest.raises(ValueError, match="lists of strings"):
        load_users({"users": [{"name": "n", "token": "t", "extra": {"k": "not-a-list"}}]})


async def test_object_selector_sees_old_and_new_labels_and_an_absent_object_matches_nothing(raw: Raw) -> None:
    selector = {"objectSelector": {"matchExpressions": [{"key": "locked", "operator": "DoesNotExist"}]}}
    p = policy("unlocked", [{"expression": "false", "message": "no"}])
    p["spec"]["matchConstraints"]["resourceRules"][0]["operations"] = ["CREATE", "UPDATE", "DELETE"]
    await install(raw, p, binding("unlocked", ["Deny"], matchResources=selector))
    assert (await raw.request("POST", PODS, pod_manifest("locked", locked="yes")))[0] == 201
    assert (await raw.request("POST", PODS, pod_manifest("open")))[0] == 422  # the new object has no label
    unlock = {"metadata": {"labels": {"locked": None}}}
    status, _, _ = await raw.request(
        "PATCH", f"{PODS}/locked", unlock, content_type="application/merge-patch+json"
    )
    assert status == 422  # the new object matches
    assert (await raw.request("DELETE", f"{PODS}/locked"))[0] == 200  # only oldObject, and it is labelled


async def test_the_request_is_its_json_form_so_empty_fields_are_absent(raw: Raw) -> None:
    """kube-apiserver converts the AdmissionRequest to JSON for CEL: `omitempty` fields are absent when empty,
    and an unguarded read errors (failurePolicy Fail: denied), as a policy on a real cluster would."""
    await install(raw, policy("sub", [{"expression": "request.subResource == ''"}]), binding("sub", ["Deny"]))
    status, body, _ = await raw.request("POST", PODS, pod_manifest("a"))
    assert status == 422 and "resulted in error" in body["message"] and "subResource" in body["message"]
    await raw.request("DELETE", f"{BINDINGS}/sub-binding")
    guarded = [{"expression": "request.?subResource.orValue('') == '' && !has(request.userInfo.extra)"}]
    await install(raw, policy("guarded", guarded), binding("guarded", ["Deny"]))
    assert (await raw.request("POST", PODS, pod_manifest("b")))[0] == 201
