"""The demo's cast: which pods exist, what makes each one (not) part of the mesh, and what we expect.

Pure data; `run.py` turns it into API objects, namespaces, processes and traffic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from istio_pod_network_controller.settings import annotations as ann

MESH_NAMESPACE = "demo"
LEGACY_NAMESPACE = "legacy-mesh"
NAMESPACES: dict[str, dict[str, str]] = {
    MESH_NAMESPACE: {},
    LEGACY_NAMESPACE: {ann.LEGACY_INITIALIZE: "true"},
}
APP_PORT = 8080
APP_UID = 1000
REMOTE_PORT = 9090
INJECTED_STATUS = json.dumps(
    {"initContainers": [ann.WAITER_CONTAINER], "containers": ["istio-proxy"], "volumes": ["podinfo"]}
)


@dataclass(frozen=True)
class DemoPod:
    name: str
    namespace: str
    why: str
    mesh: bool
    annotations: dict[str, str] = field(default_factory=dict)
    injected: bool = False
    host_network: bool = False

    @property
    def runs_waiter(self) -> bool:
        """Mesh pods carry the waiter init container; so does the bad-annotation pod (it must never pass)."""
        return self.mesh or ann.EXCLUDE_INBOUND_PORTS in self.annotations

    def manifest(self, node: str) -> dict[str, Any]:
        containers: list[dict[str, Any]] = [
            {"name": "app", "image": "demo/app", "ports": [{"containerPort": 8080}]}
        ]
        init: list[dict[str, Any]] = []
        if self.injected or self.runs_waiter:
            init.append({"name": ann.WAITER_CONTAINER, "image": "istio-pod-network-controller"})
        if self.injected:
            containers.append({"name": "istio-proxy", "image": "istio/proxyv2"})
        spec: dict[str, Any] = {"nodeName": node, "containers": containers, "initContainers": init}
        if self.host_network:
            spec["hostNetwork"] = True
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "annotations": dict(self.annotations),
            },
            "spec": spec,
        }


def cast(pods: int) -> list[DemoPod]:
    """Six characters (always), then more injected-style mesh pods up to `pods`."""
    initialize = {ann.LEGACY_INITIALIZE: "true"}
    injected = {ann.SIDECAR_STATUS: INJECTED_STATUS}
    base = [
        DemoPod("legacy-annotated", MESH_NAMESPACE, "2018 pod annotation", True, initialize),
        DemoPod("in-legacy-namespace", LEGACY_NAMESPACE, "2018 namespace annotation", True),
        DemoPod("injected", MESH_NAMESPACE, "injected sidecar + waiter", True, injected, injected=True),
        DemoPod("plain", MESH_NAMESPACE, "no mesh marker", False),
        DemoPod(
            "host-network", MESH_NAMESPACE, "hostNetwork: never touched", False, initialize, host_network=True
        ),
        DemoPod(
            "bad-annotation",
            MESH_NAMESPACE,
            "invalid annotation: fail closed",
            False,
            {**initialize, ann.EXCLUDE_INBOUND_PORTS: "8081,http"},
        ),
    ]
    extra = [
        DemoPod(f"injected-{i}", MESH_NAMESPACE, "injected sidecar + waiter", True, injected, injected=True)
        for i in range(2, pods - len(base) + 2)
    ]
    return base + extra
