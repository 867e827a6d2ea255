"""A simulated cluster: the API emulator in a thread, SimNodes, and what the kubelet and users would write.

The test or benchmark plays "the rest of the cluster" by writing straight into the emulator's store (pod
objects, their kubelet status, annotation edits, deletions), while each controller talks to the emulator
over HTTP as the chart's service account holding exactly the chart's rules (`rbac.cluster_role_rules()`), with
a token bound to its node (like the projected token of a DaemonSet pod), under the chart's node-restriction
ValidatingAdmissionPolicies rendered from the chart itself. close() stops every controller started here,
removes every node and stops the emulator, also after a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from istio_pod_network_controller.dataplane import apply as dataplane
from istio_pod_network_controller.dataplane.apply import BackendChoice, Drift
from istio_pod_network_controller.install import rbac
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import build_spec

from ..localapi import CORE_EVENTS, NAMESPACES, PODS, LocalAPIServer, Store, ThreadedServer
from ..localapi.rbac import pod_bound_extra, service_account_groups, service_account_username
from . import chart
from .controller import ControllerProcess, wait_for
from .node import SimNode, SimPod

Obj = dict[str, Any]
CONTROLLER_USER = service_account_username(chart.NAMESPACE, "istio-pod-network-controller")
"""The chart's service account, as the API server names it (the node-restriction policies match on it)."""
INJECTED_STATUS = json.dumps({"initContainers": [ann.WAITER_CONTAINER], "containers": ["istio-proxy"]})
HOST_RULE_TOOLS = (
    "iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save", "nft",
)  # fmt: skip
_names = itertools.count(1)


def unique_name(prefix: str) -> str:
    """Short and unique across parallel runs (netns and cgroup names are host-global)."""
    return f"{prefix}{os.getpid() % 10000}x{next(_names)}"


def pod_manifest(
    name: str,
    namespace: str,
    node: str,
    *,
    mesh: bool = True,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    host_network: bool = False,
) -> Obj:
    """A pod as the injector leaves it: `mesh` adds the sidecar status and the waiter init container."""
    notes = {**({ann.SIDECAR_STATUS: INJECTED_STATUS} if mesh else {}), **(annotations or {})}
    inits = [{"name": ann.WAITER_CONTAINER, "image": "ipnc"}] if mesh else []
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": notes,
            "labels": dict(labels or {}),
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "initContainers": inits,
            "containers": [{"name": "app", "image": "app"}, {"name": "istio-proxy", "image": "proxy"}],
        },
    }


def kubelet_status(
    pod_ip: str | None, phase: str = "Running", container_ids: Sequence[str] = (), host_ip: str | None = None
) -> Obj:
    """The status the kubelet reports once the sandbox exists (no IP: still Pending); hostIP when known."""
    running = {"image": "app", "imageID": "app", "ready": True, "restartCount": 0, "state": {"running": {}}}
    containers = [{"name": "app", "containerID": cid, **running} for cid in container_ids]
    host: Obj = {"hostIP": host_ip, "hostIPs": [{"ip": host_ip}]} if host_ip else {}
    if pod_ip is None:
        return {"phase": "Pending", **host, **({"containerStatuses": containers} if containers else {})}
    status: Obj = {"phase": phase, **host, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}
    return {**status, "containerStatuses": containers} if containers else status


def set_status(store: Store, namespace: str, name: str, status: Obj) -> None:
    """Write a pod's status through the status subresource, as the kubelet does."""
    store.mutate(PODS, namespace, name, lambda obj: {**obj, "status": status}, subresource="status")


def host_rules() -> str:
    """The host namespace's rules in every rule system, comments and counters removed; read only."""
    out = []
    for tool in HOST_RULE_TOOLS:
        argv = ["nft", "list", "ruleset"] if tool == "nft" else [tool]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        out.append(f"== {tool} rc={done.returncode}\n{done.stdout}")
    text = re.sub(r"^#.*$", "", "\n".join(out), flags=re.MULTILINE)
    return re.sub(r"\[\d+:\d+\]", "[]", text)


class SimCluster:
    """One emulator, any number of SimNodes and controllers; use as a context manager."""

    def __init__(
        self, *, history_size: int = 1000, bookmark_interval: float = 60.0, node_restriction: bool = True
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="ipnc-cluster-"))
        self.nodes: list[SimNode] = []
        self.controllers: list[ControllerProcess] = []
        self._kubeconfigs: dict[tuple[str, str | None], Path] = {}
        try:
            server = LocalAPIServer(history_size=history_size, bookmark_interval=bookmark_interval)
            if node_restriction:
                server.install_policies(chart.policies())
            self.api: ThreadedServer = server.start_in_thread()
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def __enter__(self) -> SimCluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def store(self) -> Store:
        return self.api.store

    # -- nodes and controllers ----------------------------------------------------------------------------

    def add_node(self, prefix: str = "ipnc", subnet: int | None = None) -> SimNode:
        """A new node with a unique name; subnets differ per node unless given."""
        node = SimNode(unique_name(prefix), subnet if subnet is not None else 100 + len(self.nodes))
        self.nodes.append(node)
        return node

    def kubeconfig(
        self,
        user: str = CONTROLLER_USER,
        rules: Iterable[Mapping[str, Any]] | None = None,
        *,
        node: str | None = None,
    ) -> Path:
        """A kubeconfig for `user`, created once per node with `rules` (default: the chart's ClusterRole).

        With `node`, the token is bound to a pod on that node (its userInfo.extra names the node), as the
        projected token of the DaemonSet's pod there is.
        """
        key = (user, node)
        if key not in self._kubeconfigs:
            extra = pod_bound_extra(node, f"istio-pod-network-controller-{node}") if node else None
            created = self.api.api.add_user(
                user,
                secrets.token_hex(16),
                rules or rbac.cluster_role_rules(),
                groups=service_account_groups(chart.NAMESPACE) if user == CONTROLLER_USER else (),
                extra=extra,
            )
            path = self.workdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', user)}-{node or 'unbound'}.kubeconfig"
            self._kubeconfigs[key] = self.api.api.write_kubeconfig(path, created)
        return self._kubeconfigs[key]

    def start_controller(
        self, node: SimNode | str, extra: Sequence[str] = (), *, user: str = CONTROLLER_USER
    ) -> ControllerProcess:
        """The real controller for `node` as `user`; its log is kept in the cluster's work directory."""
        name = node if isinstance(node, str) else node.name
        log = self.workdir / f"controller-{name}-{len(self.controllers)}.log"
        controller = ControllerProcess.start(self.kubeconfig(user, node=name), name, log, extra)
        self.controllers.append(controller)
        return controller

    # -- API objects --------------------------------------------------------------------------------------

    def add_namespace(self, name: str, annotations: Mapping[str, str] | None = None) -> None:
        meta = {"name": name, "annotations": dict(annotations or {})}
        self.store.create(NAMESPACES, None, {"metadata": meta})

    def create_pod(self, node: SimNode, sim: SimPod | None, name: str, namespace: str = "default",
                   **manifest: Any) -> Obj:  # fmt: skip
        """Store the pod object (status included when `sim` has an address) and hand its UID to `sim`."""
        body = pod_manifest(name, namespace, node.name, **manifest)
        body["status"] = (
            kubelet_status(sim.ip, "Running", sim.container_ids, sim.host_ip) if sim else kubelet_status(None)
        )
        obj = self.store.create(PODS, namespace, body)
        if sim is not None:
            node.adopt(sim, obj["metadata"]["uid"])
        return obj

    def add_pod(self, node: SimNode, name: str, namespace: str = "default", *, host_network: bool = False,
                **manifest: Any) -> SimPod:  # fmt: skip
        """API object, then the sandbox (netns, cgroup, process), then the kubelet's status with its IP."""
        body = pod_manifest(name, namespace, node.name, host_network=host_network, **manifest)
        obj = self.store.create(PODS, namespace, body)
        sim = node.add_pod(name, namespace, obj["metadata"]["uid"], host_network=host_network)
        if sim.ip is not None:
            self.report(sim)
        return sim

    def start_pod(self, node: SimNode, name: str, namespace: str = "default", **manifest: Any) -> SimPod:
        """API object, then the runtime at work: its process of the pod's cgroup in the node's namespace,
        no sandbox and no pod IP yet (Pending, hostIP reported). finish_sandbox() goes on."""
        obj = self.store.create(PODS, namespace, pod_manifest(name, namespace, node.name, **manifest))
        sim = node.begin_sandbox(name, namespace, obj["metadata"]["uid"])
        set_status(self.store, namespace, name, kubelet_status(None, host_ip=sim.host_ip))
        return sim

    def finish_sandbox(self, node: SimNode, pod: SimPod, *, report: bool = True) -> None:
        """The sandbox exists (the runtime's process exits); the kubelet posts its IP unless told not to."""
        node.create_sandbox(pod)
        if report:
            self.report(pod)

    def report(
        self,
        pod: SimPod,
        *,
        ip: str | None = None,
        containers: bool = True,
        container_ids: Sequence[str] | None = None,
    ) -> None:
        """The kubelet's status update: the pod's IP (or `ip`) and, unless told not to, its containers
        (or `container_ids`, say the old ones still listed after a sandbox change)."""
        ids = container_ids if container_ids is not None else pod.container_ids if containers else ()
        status = kubelet_status(ip or pod.ip, container_ids=ids, host_ip=pod.host_ip)
        set_status(self.store, pod.namespace, pod.name, status)

    def recreate_sandbox(self, node: SimNode, pod: SimPod, order: str = "ip-first") -> None:
        """The kubelet's SandboxChanged: a new sandbox, then two status updates in the given order.

        "ip-first": the new IP while the containers start (none reported), then the containers.
        "containers-first": the new containers while the old IP is still reported, then the new IP.
        "ip-only": the new IP while the status still lists the old containers (the waiter holds the new
        ones), and nothing more: only the IP tells that the sandbox changed.
        """
        old_ip, old_ids = pod.ip, pod.container_ids
        node.recreate_sandbox(pod)
        if order == "ip-first":
            self.report(pod, containers=False)
            self.report(pod)
        elif order == "containers-first":
            self.report(pod, ip=old_ip)
            self.report(pod)
        elif order == "ip-only":
            self.report(pod, container_ids=old_ids)
        else:
            raise ValueError(f"unknown order {order!r}")

    def restart_container(self, node: SimNode, pod: SimPod) -> None:
        """A container restart in the same sandbox: a new container ID in the status, same IP."""
        node.restart_container(pod)
        self.report(pod)

    def reboot(self, node: SimNode) -> None:
        """A node reboot: every pod's sandbox recreated (new netns, new IP) and reported, pod by pod."""
        for pod in list(node.pods):
            if not pod.host_network:
                node.recreate_sandbox(pod)
                self.report(pod)

    def recreate_pod(self, node: SimNode, pod: SimPod, **manifest: Any) -> SimPod:
        """The pod deleted and created again under the same name (a new UID, sandbox and IP)."""
        self.delete_pod(node, pod)
        return self.add_pod(node, pod.name, pod.namespace, **manifest)

    def delete_pod(self, node: SimNode, pod: SimPod) -> None:
        """Delete the API object (if still there) and the pod's sandbox on the node."""
        with contextlib.suppress(Exception):
            self.store.delete(PODS, pod.namespace, pod.name)
        node.remove_pod(pod)

    def edit_annotations(self, pod: SimPod, changes: Mapping[str, str | None]) -> None:
        """A user's annotation edit (None removes the key)."""

        def edit(obj: Obj) -> Obj:
            notes = {**(obj["metadata"].get("annotations") or {}), **changes}
            notes = {k: v for k, v in notes.items() if v is not None}
            return {**obj, "metadata": {**obj["metadata"], "annotations": notes}}

        self.store.mutate(PODS, pod.namespace, pod.name, edit)

    # -- observation --------------------------------------------------------------------------------------

    def pod_object(self, pod: SimPod) -> Obj:
        return dict(self.store.get(PODS, pod.namespace, pod.name))

    def annotations(self, pod: SimPod) -> dict[str, str]:
        return dict(self.pod_object(pod)["metadata"].get("annotations") or {})

    def initialized(self, pod: SimPod) -> bool:
        return self.annotations(pod).get(ann.STATUS) == ann.STATUS_INITIALIZED

    def wait_initialized(self, pods: Sequence[SimPod], timeout: float, log: Callable[[], str] = str) -> None:
        wait_for(lambda: all(self.initialized(p) for p in pods), timeout, f"pods marked\n{log()}", 0.1)

    def events(self, pod: SimPod) -> list[Obj]:
        """Core/v1 Events about the pod (by namespace and name), oldest first."""
        return [
            event
            for event in self.store.objects(CORE_EVENTS, pod.namespace)
            if (event.get("involvedObject") or {}).get("name") == pod.name
        ]

    def reasons(self, pod: SimPod) -> list[str]:
        return [event["reason"] for event in self.events(pod)]

    def verify(self, pod: SimPod, backend: BackendChoice = "auto") -> Drift:
        """The pod's live rules against the spec its annotations ask for (under default controller flags)."""
        if pod.netns is None:
            raise ValueError(f"{pod.name} has no network namespace of its own")
        spec = build_spec(self.annotations(pod))
        return dataplane.verify(pod.netns.pinned, spec, backend)

    # -- teardown -----------------------------------------------------------------------------------------

    def close(self) -> None:
        for controller in self.controllers:
            with contextlib.suppress(Exception):
                controller.stop(5)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()
        with contextlib.suppress(Exception):
            self.api.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
