"""Local copies of this node's pods (keyed by UID) and of the cluster's namespaces (keyed by name).

Pods are slimmed to the fields the controller reads, so a node with a thousand pods costs little memory.
A relist replaces the whole content and reports what changed and what vanished, so deletions missed while
a watch was down are synthesised rather than lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

Obj = dict[str, Any]

_POD_META = ("name", "namespace", "uid", "resourceVersion", "annotations", "labels", "deletionTimestamp")


def slim_pod(pod: Obj) -> Obj:
    """The fields selection and reconciliation read, in the API's own shape."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    return {
        "metadata": {k: meta[k] for k in _POD_META if k in meta},
        "spec": {
            "hostNetwork": bool(spec.get("hostNetwork")),
            "initContainers": [{"name": c.get("name", "")} for c in spec.get("initContainers") or ()],
        },
        "status": {
            "phase": status.get("phase"),
            "podIP": status.get("podIP"),
            "podIPs": [{"ip": p.get("ip")} for p in status.get("podIPs") or () if p.get("ip")],
            "hostIP": status.get("hostIP"),
            "hostIPs": [{"ip": p.get("ip")} for p in status.get("hostIPs") or () if p.get("ip")],
            "containerIDs": [
                c["containerID"]
                for key in ("initContainerStatuses", "containerStatuses")
                for c in status.get(key) or ()
                if c.get("containerID")
            ],
        },
    }


def slim_namespace(ns: Obj) -> Obj:
    meta = ns.get("metadata") or {}
    return {"metadata": {k: meta[k] for k in ("name", "uid", "resourceVersion", "annotations") if k in meta}}


def pod_ips(pod: Obj) -> list[str]:
    status = pod.get("status") or {}
    ips = [p["ip"] for p in status.get("podIPs") or ()]
    if status.get("podIP") and status["podIP"] not in ips:
        ips.append(status["podIP"])
    return ips


def host_ips(pod: Obj) -> list[str]:
    """status.hostIPs and status.hostIP: the node's addresses, as the kubelet reports them."""
    status = pod.get("status") or {}
    ips = [p["ip"] for p in status.get("hostIPs") or ()]
    if status.get("hostIP") and status["hostIP"] not in ips:
        ips.append(status["hostIP"])
    return ips


def resource_version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


class ObjectCache:
    """Objects by key; upsert reports whether anything changed (a different resourceVersion)."""

    def __init__(self, key: Callable[[Obj], str], slim: Callable[[Obj], Obj]) -> None:
        self._key = key
        self._slim = slim
        self.objects: dict[str, Obj] = {}

    def __len__(self) -> int:
        return len(self.objects)

    def get(self, key: str) -> Obj | None:
        return self.objects.get(key)

    def upsert(self, obj: Obj) -> tuple[str, bool]:
        key = self._key(obj)
        old = self.objects.get(key)
        if old is not None and resource_version(old) == resource_version(obj):
            return key, False
        self.objects[key] = self._slim(obj)
        return key, True

    def remove(self, obj_or_key: Obj | str) -> Obj | None:
        key = obj_or_key if isinstance(obj_or_key, str) else self._key(obj_or_key)
        return self.objects.pop(key, None)

    def replace(self, items: Iterable[Obj]) -> tuple[list[str], list[Obj]]:
        """Make the cache equal to a fresh list: (keys added or changed, objects that vanished)."""
        seen: set[str] = set()
        changed = []
        for obj in items:
            key, was_changed = self.upsert(obj)
            seen.add(key)
            if was_changed:
                changed.append(key)
        gone = [self.objects.pop(key) for key in list(self.objects) if key not in seen]
        return changed, gone


def pod_key(pod: Obj) -> str:
    return str(pod["metadata"]["uid"])


def namespace_key(ns: Obj) -> str:
    return str(ns["metadata"]["name"])


class PodCache(ObjectCache):
    def __init__(self) -> None:
        super().__init__(pod_key, slim_pod)

    def in_namespace(self, namespace: str) -> list[str]:
        return [uid for uid, pod in self.objects.items() if pod["metadata"].get("namespace") == namespace]


class NamespaceCache(ObjectCache):
    def __init__(self) -> None:
        super().__init__(namespace_key, slim_namespace)
