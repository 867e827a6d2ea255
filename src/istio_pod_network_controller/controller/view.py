"""PodView: a typed, frozen view of one cached pod, built once per reconcile pass.

The cache keeps pods in the API's own shape (selection reads them so); everything reconciliation needs is
read from that dict here, once, so the decision and the executor work on typed fields and never on raw keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..settings import annotations as ann
from .cache import Obj, host_ips, pod_ips


@dataclass(frozen=True, slots=True)
class PodView:
    uid: str
    name: str
    namespace: str
    resource_version: str
    annotations: Mapping[str, str]
    ips: tuple[str, ...]
    """status.podIPs, then status.podIP when it is not among them: the sandbox's addresses."""
    host_ips: tuple[str, ...]
    """status.hostIPs and status.hostIP: the node's addresses (a namespace holding one is the node's)."""
    container_ids: tuple[str, ...]
    """Runtime IDs of the init and app containers that exist now ("containerd://..."), sorted."""
    raw: Obj = field(repr=False, compare=False)
    """The cached dict, for selection (a pure function over the API's shape)."""

    @classmethod
    def of(cls, pod: Obj) -> PodView:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        notes = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
        return cls(
            uid=str(meta.get("uid", "")),
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            annotations=MappingProxyType(notes),
            ips=tuple(str(ip) for ip in pod_ips(pod)),
            host_ips=tuple(str(ip) for ip in host_ips(pod)),
            container_ids=tuple(sorted({str(c) for c in status.get("containerIDs") or ()})),
            raw=pod,
        )

    @property
    def marked(self) -> bool:
        """Whether the pod carries our mark (by anyone: this process, an earlier one, or a forger)."""
        return self.annotations.get(ann.STATUS) == ann.STATUS_INITIALIZED

    @property
    def digest(self) -> str | None:
        return self.annotations.get(ann.SPEC_DIGEST)
