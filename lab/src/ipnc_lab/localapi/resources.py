"""The resource types the emulator serves, with the facts discovery and field selectors need."""

from __future__ import annotations

from dataclasses import dataclass, field

_COMMON_FIELDS = frozenset({"metadata.name", "metadata.namespace"})


@dataclass(frozen=True, slots=True)
class ResourceType:
    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    has_status: bool = False
    field_labels: frozenset[str] = field(default=frozenset())

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Unique name of the resource in the store, e.g. `pods` or `events.events.k8s.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def verbs(self) -> list[str]:
        return ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

    def supports_field(self, name: str) -> bool:
        return name in _COMMON_FIELDS or name in self.field_labels


PODS = ResourceType(
    "",
    "v1",
    "pods",
    "pod",
    "Pod",
    namespaced=True,
    short_names=("po",),
    has_status=True,
    field_labels=frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        }
    ),
)
NAMESPACES = ResourceType(
    "", "v1", "namespaces", "namespace", "Namespace", namespaced=False, short_names=("ns",), has_status=True,
    field_labels=frozenset({"status.phase"}),
)  # fmt: skip
NODES = ResourceType(
    "", "v1", "nodes", "node", "Node", namespaced=False, short_names=("no",), has_status=True,
    field_labels=frozenset({"spec.unschedulable"}),
)  # fmt: skip
_EVENT_FIELDS = frozenset(
    {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    }
)
CORE_EVENTS = ResourceType(
    "", "v1", "events", "event", "Event", namespaced=True, short_names=("ev",), field_labels=_EVENT_FIELDS
)
EVENTS_V1 = ResourceType(
    "events.k8s.io", "v1", "events", "event", "Event", namespaced=True, short_names=("ev",),
    field_labels=frozenset({"regarding.kind", "regarding.name", "regarding.namespace", "reason", "type"}),
)  # fmt: skip

VALIDATING_ADMISSION_POLICIES = ResourceType(
    "admissionregistration.k8s.io", "v1", "validatingadmissionpolicies", "validatingadmissionpolicy",
    "ValidatingAdmissionPolicy", namespaced=False, has_status=True,
)  # fmt: skip
VALIDATING_ADMISSION_POLICY_BINDINGS = ResourceType(
    "admissionregistration.k8s.io", "v1", "validatingadmissionpolicybindings",
    "validatingadmissionpolicybinding", "ValidatingAdmissionPolicyBinding", namespaced=False,
)  # fmt: skip

ALL_RESOURCES: tuple[ResourceType, ...] = (
    PODS, NAMESPACES, NODES, CORE_EVENTS, EVENTS_V1,
    VALIDATING_ADMISSION_POLICIES, VALIDATING_ADMISSION_POLICY_BINDINGS,
)  # fmt: skip


def lookup(group: str, version: str, plural: str) -> ResourceType | None:
    for res in ALL_RESOURCES:
        if res.group == group and res.version == version and res.plural == plural:
            return res
    return None


def group_versions() -> dict[str, list[str]]:
    """API group -> versions it serves ("" is the legacy core group)."""
    out: dict[str, list[str]] = {}
    for res in ALL_RESOURCES:
        versions = out.setdefault(res.group, [])
        if res.version not in versions:
            versions.append(res.version)
    return out
