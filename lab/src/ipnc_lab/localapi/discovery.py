"""Discovery documents (`/version`, `/api`, `/apis`, resource lists) built from the resource table."""

from __future__ import annotations

from typing import Any

from .resources import ALL_RESOURCES, group_versions

#: Groups served only for special endpoints (not stored resources).
AUTHORIZATION_GROUP = "authorization.k8s.io"

#: kubectl asks for /openapi/v2 in protobuf only (after /openapi/v3, which answers 404 here). This is the
#: protobuf encoding of the openapi_v2.Document `{swagger: "2.0", info: {title: "Kubernetes", version: ...}}`.
OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
_INFO = b"\x0a\x0aKubernetes\x12\x07v1.32.0"
EMPTY_OPENAPI_V2 = b"\x0a\x032.0\x12" + bytes([len(_INFO)]) + _INFO


def version() -> dict[str, Any]:
    return {
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-localapi",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def core_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": gvs, "preferredVersion": gvs[0]}


def _groups() -> dict[str, list[str]]:
    groups = {g: v for g, v in group_versions().items() if g}
    groups[AUTHORIZATION_GROUP] = ["v1"]
    return groups


def group_list() -> dict[str, Any]:
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group(g, v) for g, v in _groups().items()],
    }


def group(name: str) -> dict[str, Any] | None:
    versions = _groups().get(name)
    return None if versions is None else {"kind": "APIGroup", "apiVersion": "v1", **_group(name, versions)}


def resource_list(group_name: str, version_name: str) -> dict[str, Any] | None:
    gv = f"{group_name}/{version_name}" if group_name else version_name
    if group_name == AUTHORIZATION_GROUP and version_name == "v1":
        resources: list[dict[str, Any]] = [
            {
                "name": "selfsubjectaccessreviews",
                "singularName": "selfsubjectaccessreview",
                "namespaced": False,
                "kind": "SelfSubjectAccessReview",
                "verbs": ["create"],
            }
        ]
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}
    resources = []
    for res in ALL_RESOURCES:
        if res.group != group_name or res.version != version_name:
            continue
        entry: dict[str, Any] = {
            "name": res.plural,
            "singularName": res.singular,
            "namespaced": res.namespaced,
            "kind": res.kind,
            "verbs": res.verbs,
        }
        if res.short_names:
            entry["shortNames"] = list(res.short_names)
        if res.kind == "Pod":
            entry["categories"] = ["all"]
        resources.append(entry)
        if res.has_status:
            resources.append(
                {
                    "name": f"{res.plural}/status",
                    "singularName": "",
                    "namespaced": res.namespaced,
                    "kind": res.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    if not resources:
        return None
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}
