"""ValidatingAdmissionPolicies (admissionregistration.k8s.io/v1) evaluated with a real CEL engine.

The emulator serves policies and bindings as ordinary objects; every create, update, patch and delete that
passed RBAC is then judged as kube-apiserver judges it: the policy's matchConstraints and the binding's
matchResources select the request, matchConditions must all hold, `variables` are computed in order and each
validation must be true. A failed validation under a `Deny` binding ends the request with the policy's
message and reason (403 for `reason: Forbidden`); `Warn` adds a Warning header; `Audit` is accepted and
has no visible effect here. An expression that errors obeys the policy's failurePolicy.

CEL is Google's C++ implementation (cel-expr-python) with the optional and strings extensions that
Kubernetes enables, so `object.metadata.?annotations.orValue({})`, `map[?key]` and the macros behave as on
a real server. Not emulated: paramKind/paramRef (a policy that asks for params is refused on create),
`authorizer`, type checking against OpenAPI schemas (expressions see JSON maps), CEL cost limits,
matchPolicy (each resource has one version here).
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cel_expr_python import cel
from cel_expr_python.ext import ext_optional, ext_strings

from .errors import ApiError
from .resources import NAMESPACES, ResourceType
from .selectors import LabelSelector, Requirement

Obj = dict[str, Any]
Lookup = Callable[[str], Obj | None]
"""namespace name -> the Namespace object, or None."""

GROUP = "admissionregistration.k8s.io"
_ROOTS = ("object", "oldObject", "request", "params", "namespaceObject", "variables")
_REASON_CODES = {"Unauthorized": 401, "Forbidden": 403, "Invalid": 422, "RequestEntityTooLarge": 413}
_MAX_MESSAGE = 5000


class PolicyError(ValueError):
    """A policy or binding the emulator cannot evaluate (the API answers 422 on create/update)."""


@dataclass(frozen=True, slots=True)
class UserInfo:
    username: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def to_cel(self) -> Obj:
        return _omit_empty(
            {
                "username": self.username,
                "uid": self.uid,
                "groups": list(self.groups),
                "extra": {key: list(values) for key, values in self.extra.items()},
            }
        )


@dataclass(frozen=True, slots=True)
class Request:
    """One write as admission sees it: a PATCH arrives as UPDATE with the patched object."""

    operation: str  # CREATE | UPDATE | DELETE
    resource: ResourceType
    subresource: str
    namespace: str
    name: str
    user: UserInfo
    obj: Obj | None
    old: Obj | None

    def to_cel(self) -> Obj:
        """The AdmissionRequest as kube-apiserver hands it to CEL: its JSON form, so the `omitempty` fields
        (subResource, name, namespace, userInfo's uid/groups/extra...) are absent when empty, and reading one
        then is an error unless the expression guards it (`request.?subResource.orValue('')`)."""
        res = self.resource
        kind = {"group": res.group, "version": res.version, "kind": res.kind}
        resource = {"group": res.group, "version": res.version, "resource": res.plural}
        optional = _omit_empty(
            {
                "subResource": self.subresource,
                "requestSubResource": self.subresource,
                "name": self.name,
                "namespace": self.namespace,
            }
        )
        return {
            "uid": str(uuid.uuid4()),
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            **optional,
            "operation": self.operation,
            "userInfo": self.user.to_cel(),
            "dryRun": False,
        }


def _omit_empty(fields: Obj) -> Obj:
    return {key: value for key, value in fields.items() if value not in ("", [], {})}


# -- CEL ------------------------------------------------------------------------------------------------


@functools.cache
def _environment() -> Any:
    """One CEL environment: the admission variables (dynamic JSON values), optionals and string functions."""
    return cel.NewEnv(
        variables=dict.fromkeys(_ROOTS, cel.Type.DYN),
        extensions=[ext_optional.ExtOptional(), ext_strings.ExtStrings()],
    )


_COMPILE_LOCK = threading.Lock()


def compile_expression(expression: str) -> Any:
    """A compiled program, or PolicyError naming the syntax or reference error."""
    with _COMPILE_LOCK:
        try:
            return _environment().compile(expression)
        except RuntimeError as exc:
            raise PolicyError(f"compilation failed: {exc}") from None


class EvalError(Exception):
    """A CEL evaluation error (no such key, wrong type, division by zero...)."""


def evaluate(program: Any, data: Mapping[str, Any]) -> Any:
    result = program.eval(data=dict(data))
    if result.type() == cel.Type.ERROR:
        raise EvalError(str(result.value()))
    return result.plain_value()


# -- compiled policies -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Validation:
    expression: str
    program: Any
    message: str
    message_program: Any | None
    reason: str


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str
    failure_policy: str
    constraints: Obj
    conditions: tuple[tuple[str, Any], ...]
    variables: tuple[tuple[str, Any], ...]
    validations: tuple[Validation, ...]


def _expression(entry: Any, where: str) -> tuple[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("expression"), str):
        raise PolicyError(f"{where}: an expression is required")
    try:
        return entry["expression"], compile_expression(entry["expression"])
    except PolicyError as exc:
        raise PolicyError(f"{where}.expression: {exc}") from None


def compile_policy(policy: Obj) -> CompiledPolicy:
    """Every expression of a policy compiled (PolicyError if one does not), as the API server does."""
    name = policy.get("metadata", {}).get("name", "")
    spec = policy.get("spec")
    if not isinstance(spec, dict):
        raise PolicyError("spec: Required value")
    if spec.get("paramKind"):
        raise PolicyError("spec.paramKind: params are not supported by the emulator")
    failure = spec.get("failurePolicy", "Fail")
    if failure not in ("Fail", "Ignore"):
        raise PolicyError(f"spec.failurePolicy: Unsupported value: {failure!r}")
    constraints = spec.get("matchConstraints")
    if not isinstance(constraints, dict) or not constraints.get("resourceRules"):
        raise PolicyError("spec.matchConstraints.resourceRules: Required value")
    conditions = tuple(
        (str(entry.get("name", "")), _expression(entry, f"spec.matchConditions[{i}]")[1])
        for i, entry in enumerate(spec.get("matchConditions") or ())
    )
    variables = tuple(
        (str(entry.get("name", "")), _expression(entry, f"spec.variables[{i}]")[1])
        for i, entry in enumerate(spec.get("variables") or ())
    )
    validations = []
    for i, entry in enumerate(spec.get("validations") or ()):
        expression, program = _expression(entry, f"spec.validations[{i}]")
        message_expression = entry.get("messageExpression")
        validations.append(
            Validation(
                expression=expression,
                program=program,
                message=str(entry.get("message") or ""),
                message_program=compile_expression(message_expression) if message_expression else None,
                reason=str(entry.get("reason") or "Invalid"),
            )
        )
    if not validations:
        raise PolicyError("spec.validations: Required value (the emulator evaluates validations only)")
    return CompiledPolicy(name, failure, constraints, conditions, variables, tuple(validations))


# -- matching --------------------------------------------------------------------------------------------


def _rule_matches(rule: Mapping[str, Any], request: Request) -> bool:
    res = request.resource

    def listed(key: str, value: str) -> bool:
        values = rule.get(key) or ()
        return "*" in values or value in values

    if not (listed("operations", request.operation) and listed("apiGroups", res.group)):
        return False
    if not listed("apiVersions", res.version):
        return False
    resources = rule.get("resources") or ()
    if request.subresource:
        sub = request.subresource
        wanted = {f"{res.plural}/{sub}", f"{res.plural}/*", f"*/{sub}", "*/*"}
    else:
        wanted = {res.plural, "*", "*/*"}
    if not wanted & set(resources):
        return False
    scope = rule.get("scope", "*")
    if (scope == "Cluster" and res.namespaced) or (scope == "Namespaced" and not res.namespaced):
        return False
    names = rule.get("resourceNames") or ()
    return not names or request.name in names


def label_selector(selector: Mapping[str, Any] | None) -> LabelSelector:
    """A metav1.LabelSelector object ({matchLabels, matchExpressions}) as the emulator's selector."""
    if not selector:
        return LabelSelector()
    requirements = [
        Requirement(k, "=", frozenset({v})) for k, v in (selector.get("matchLabels") or {}).items()
    ]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in selector.get("matchExpressions") or ():
        op = ops.get(expr.get("operator", ""))
        if op is None:
            raise PolicyError(f"unknown label selector operator {expr.get('operator')!r}")
        requirements.append(Requirement(expr["key"], op, frozenset(expr.get("values") or ())))
    return LabelSelector(tuple(requirements))


def _labels(obj: Obj | None) -> Mapping[str, str]:
    return ((obj or {}).get("metadata") or {}).get("labels") or {}


def _selects(match: Mapping[str, Any], request: Request, namespaces: Lookup, *, rules_required: bool) -> bool:
    rules = match.get("resourceRules") or ()
    if (rules or rules_required) and not any(_rule_matches(rule, request) for rule in rules):
        return False
    if any(_rule_matches(rule, request) for rule in match.get("excludeResourceRules") or ()):
        return False
    objects = label_selector(match.get("objectSelector"))
    if not objects.empty and not any(
        o is not None and objects.matches(_labels(o)) for o in (request.obj, request.old)
    ):
        return False  # an absent object (oldObject of a CREATE, object of a DELETE) matches no selector
    selector = label_selector(match.get("namespaceSelector"))
    if request.resource is NAMESPACES:
        return selector.matches(_labels(request.obj or request.old))
    if not request.resource.namespaced:
        return True
    return selector.matches(_labels(namespaces(request.namespace)))


# -- the decision ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    policy: str
    binding: str
    actions: tuple[str, ...]
    message: str
    reason: str


def _message(validation: Validation, data: Mapping[str, Any]) -> str:
    if validation.message_program is not None:
        try:
            text = evaluate(validation.message_program, data)
        except EvalError:
            text = None
        if isinstance(text, str) and text.strip() and "\n" not in text and len(text) <= _MAX_MESSAGE:
            return text
    return validation.message or f"failed expression: {validation.expression}"


def _judge(policy: CompiledPolicy, request: Request, namespace_obj: Obj | None) -> tuple[str, str] | None:
    """(message, reason) of the first failing validation, or None when the policy admits the request."""
    data: dict[str, Any] = {
        "object": request.obj,
        "oldObject": request.old,
        "request": request.to_cel(),
        "params": None,
        "namespaceObject": namespace_obj,
        "variables": {},
    }
    fail = policy.failure_policy == "Fail"
    for name, program in policy.conditions:
        try:
            if evaluate(program, data) is not True:
                return None
        except EvalError as exc:
            return (f"matchCondition '{name}' resulted in error: {exc}", "Invalid") if fail else None
    computed: dict[str, Any] = {}
    for name, program in policy.variables:
        try:
            computed[name] = evaluate(program, {**data, "variables": computed})
        except EvalError:
            continue  # a validation that reads it errors with "no such key", as a lazy variable would
    data["variables"] = computed
    for validation in policy.validations:
        try:
            ok = evaluate(validation.program, data)
        except EvalError as exc:
            if fail:
                return f"expression '{validation.expression}' resulted in error: {exc}", "Invalid"
            continue
        if ok is not True:
            return _message(validation, data), validation.reason
    return None


class Admission:
    """Evaluates the policies and bindings that `objects()` returns; compiled policies are cached."""

    def __init__(
        self,
        policies: Callable[[], list[Obj]],
        bindings: Callable[[], list[Obj]],
        namespaces: Lookup,
    ) -> None:
        self._policies = policies
        self._bindings = bindings
        self._namespaces = namespaces
        self._cache: dict[tuple[str, str], CompiledPolicy] = {}
        self._lock = threading.Lock()

    def _compiled(self, policy: Obj) -> CompiledPolicy:
        meta = policy["metadata"]
        key = (meta["uid"], meta["resourceVersion"])
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is None:
                compiled = self._cache[key] = compile_policy(policy)
            return compiled

    def decisions(self, request: Request) -> Iterator[Decision]:
        """One decision per (policy, binding) that refuses the request."""
        bindings = self._bindings()
        if not bindings:
            return
        policies = {p["metadata"]["name"]: p for p in self._policies()}
        namespace_obj = self._namespaces(request.namespace) if request.namespace else None
        for binding in bindings:
            spec = binding.get("spec") or {}
            policy = policies.get(spec.get("policyName", ""))
            if policy is None:
                continue  # a binding to a missing policy is ignored, as on the real server
            compiled = self._compiled(policy)
            if not _selects(compiled.constraints, request, self._namespaces, rules_required=True):
                continue
            if not _selects(
                spec.get("matchResources") or {}, request, self._namespaces, rules_required=False
            ):
                continue
            verdict = _judge(compiled, request, namespace_obj)
            if verdict is not None:
                message, reason = verdict
                actions = tuple(spec.get("validationActions") or ())
                yield Decision(compiled.name, binding["metadata"]["name"], actions, message, reason)

    def admit(self, request: Request) -> list[str]:
        """Warnings to send; raises the API error of the first Deny decision."""
        warnings = []
        for decision in self.decisions(request):
            text = (
                f"ValidatingAdmissionPolicy '{decision.policy}' with binding '{decision.binding}' "
                f"denied request: {decision.message}"
            )
            if "Deny" in decision.actions:
                raise denied(request, text, decision.reason)
            if "Warn" in decision.actions:
                warnings.append(text)
        return warnings


def denied(request: Request, text: str, reason: str) -> ApiError:
    """The Status kube-apiserver answers a denied request with."""
    res = request.resource
    qualified = f"{res.plural}.{res.group}" if res.group else res.plural
    details: dict[str, Any] = {"kind": res.plural, "causes": [{"message": text}]}
    if res.group:
        details["group"] = res.group
    if request.name:
        details["name"] = request.name
    message = f'{qualified} "{request.name}" is forbidden: {text}'
    return ApiError(_REASON_CODES.get(reason, 422), reason, message, details=details)


def check_definition(res: ResourceType, obj: Obj) -> None:
    """Refuse (422) a policy whose expressions do not compile, or a binding without a policy name."""
    name = (obj.get("metadata") or {}).get("name", "")
    try:
        if res.kind == "ValidatingAdmissionPolicy":
            compile_policy(obj)
        elif res.kind == "ValidatingAdmissionPolicyBinding":
            spec = obj.get("spec") or {}
            if not spec.get("policyName"):
                raise PolicyError("spec.policyName: Required value")
            if not spec.get("validationActions"):
                raise PolicyError("spec.validationActions: Required value")
            if spec.get("paramRef"):
                raise PolicyError("spec.paramRef: params are not supported by the emulator")
            for action in spec["validationActions"]:
                if action not in ("Deny", "Warn", "Audit"):
                    raise PolicyError(f"spec.validationActions: Unsupported value: {action!r}")
    except PolicyError as exc:
        raise ApiError(
            422,
            "Invalid",
            f'{res.kind}.{GROUP} "{name}" is invalid: {exc}',
            details={"name": name, "group": GROUP, "kind": res.kind},
        ) from None
