"""Users (bearer tokens) and an RBAC-like rule table, with the real server's Forbidden messages."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

VERBS = frozenset({"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"})


@dataclass(frozen=True, slots=True)
class Rule:
    """Allows `verbs` on `resources` ("pods", "pods/status", "*") in `api_groups`, in `namespaces`.

    `namespaces=None` allows every namespace and the cluster scope; a set limits the rule to requests
    made inside those namespaces (like a RoleBinding), so cluster-wide lists are denied.
    """

    verbs: frozenset[str]
    resources: frozenset[str]
    api_groups: frozenset[str] = frozenset({"*"})
    namespaces: frozenset[str] | None = None

    def allows(self, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        return (
            ("*" in self.verbs or verb in self.verbs)
            and ("*" in self.api_groups or group in self.api_groups)
            and ("*" in self.resources or resource in self.resources)
            and (self.namespaces is None or (namespace is not None and namespace in self.namespaces))
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        verbs = frozenset(data.get("verbs") or ())
        unknown = verbs - VERBS - {"*"}
        if unknown:
            raise ValueError(f"unknown verbs {sorted(unknown)}")
        namespaces = data.get("namespaces")
        return cls(
            verbs=verbs,
            resources=frozenset(data.get("resources") or ()),
            api_groups=frozenset(data.get("apiGroups", ["*"])),
            namespaces=None if namespaces is None else frozenset(namespaces),
        )


ADMIN_RULES: tuple[Rule, ...] = (Rule(frozenset({"*"}), frozenset({"*"})),)


NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
NODE_UID_KEY = "authentication.kubernetes.io/node-uid"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"
CREDENTIAL_ID_KEY = "authentication.kubernetes.io/credential-id"


@dataclass(slots=True)
class User:
    """A bearer token's identity. `extra` is what admission sees as `request.userInfo.extra`."""

    name: str
    token: str
    rules: tuple[Rule, ...] = field(default=())
    groups: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)


def service_account_username(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def pod_bound_extra(
    node: str, pod: str, *, node_uid: str = "", pod_uid: str = ""
) -> dict[str, tuple[str, ...]]:
    """The extra of a pod-bound service-account token (the projected token a pod mounts) on 1.30+.

    `credential-id` is the token's JWT ID; the node and pod keys come from the pod the token is bound to.
    """
    return {
        CREDENTIAL_ID_KEY: (f"JTI={uuid.uuid4()}",),
        NODE_NAME_KEY: (node,),
        NODE_UID_KEY: (node_uid or str(uuid.uuid5(uuid.NAMESPACE_DNS, node)),),
        POD_NAME_KEY: (pod,),
        POD_UID_KEY: (pod_uid or str(uuid.uuid4()),),
    }


def service_account_groups(namespace: str) -> tuple[str, ...]:
    return ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated")


def parse_rules(rules: Iterable[Rule | Mapping[str, Any]]) -> tuple[Rule, ...]:
    return tuple(r if isinstance(r, Rule) else Rule.from_dict(r) for r in rules)


def load_users(data: Mapping[str, Any]) -> list[User]:
    """The `--rbac` file format.

    `{users: [{name, token, rules: [{verbs, resources, apiGroups?, namespaces?}], groups?, extra?}]}`;
    `extra` maps keys to lists of strings, e.g. `{authentication.kubernetes.io/node-name: [node1]}`.
    """
    users = []
    for entry in data.get("users") or ():
        if not entry.get("name") or not entry.get("token"):
            raise ValueError("every user needs a name and a token")
        extra = entry.get("extra") or {}
        if not isinstance(extra, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in extra.values()
        ):
            raise ValueError("a user's extra maps keys to lists of strings")
        users.append(
            User(
                entry["name"],
                entry["token"],
                parse_rules(entry.get("rules") or ()),
                tuple(entry.get("groups") or ()),
                {str(k): tuple(v) for k, v in extra.items()},
            )
        )
    return users


class Authorizer:
    def __init__(self) -> None:
        self._by_token: dict[str, User] = {}

    def add(self, user: User) -> None:
        self._by_token[user.token] = user

    def revoke(self, token: str) -> None:
        """Forget a token (its next request gets 401), as when a service-account token is rotated away."""
        self._by_token.pop(token, None)

    def authenticate(self, token: str) -> User | None:
        return self._by_token.get(token)

    def users(self) -> list[User]:
        return list(self._by_token.values())

    @staticmethod
    def allowed(user: User, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        return any(rule.allows(verb, group, resource, namespace) for rule in user.rules)


def forbidden_message(
    user: str,
    *,
    verb: str,
    group: str,
    resource: str,
    subresource: str | None,
    name: str | None,
    namespace: str | None,
) -> str:
    full = f"{resource}/{subresource}" if subresource else resource
    qualified = f"{resource}.{group}" if group else resource
    subject = f'{qualified} "{name}"' if name else qualified
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return (
        f'{subject} is forbidden: User "{user}" cannot {verb} resource "{full}" '
        f'in API group "{group}" {scope}'
    )
