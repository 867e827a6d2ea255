"""What the tier runs on the node: the chart's controller (with a stand-in for kube-scheduler that binds its
DaemonSet pod) and mesh pods shaped by the project's own injection, plus the reads that prove capture."""

from __future__ import annotations

import copy
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

from istio_pod_network_controller.install.injection import DEFAULT_IMAGE, InjectOptions, rewrite_pod
from istio_pod_network_controller.settings import annotations as ann

from ..sim import chart
from .kubeapi import APIError, KubeAPI, Obj, wait_for

CONTROLLER_NAMESPACE = chart.NAMESPACE
#: the node label the controller's DaemonSet selects: removing it scales the controller away from the node
CONTROLLER_LABEL = "ipnc-realnode/controller"
#: OpenShift's kube-apiserver wants this ConfigMap in a namespace whose pods mount a service-account token
OPENSHIFT_CA = "openshift-service-ca.crt"
INJECTED_STATUS = json.dumps({"initContainers": ["istio-init"], "containers": ["istio-proxy"],
                              "volumes": ["istio-envoy"]})  # fmt: skip
ISTIO_INIT_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                   "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]  # fmt: skip
SLEEP = ["sleep", "infinity"]


def _plural(kind: str) -> str:
    lower = kind.lower()
    return lower[:-1] + "ies" if lower.endswith("y") else lower + "s"


def object_path(obj: Obj) -> str:
    """The collection an object is created in."""
    group_version = obj["apiVersion"]
    base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    namespace = obj["metadata"].get("namespace")
    return f"{base}{f'/namespaces/{namespace}' if namespace else ''}/{_plural(obj['kind'])}"


def ensure_namespace(api: KubeAPI, name: str, service_ca: str) -> None:
    """The namespace, with the ConfigMap a token-mounting pod of OpenShift's kube-apiserver needs."""
    config_map = {"metadata": {"name": OPENSHIFT_CA}, "data": {"service-ca.crt": service_ca}}
    for path, body in (
        ("/api/v1/namespaces", {"metadata": {"name": name}}),
        (f"/api/v1/namespaces/{name}/configmaps", config_map),
    ):
        try:
            api.create(path, {"apiVersion": "v1", **body})
        except APIError as exc:
            if exc.status != 409:
                raise


def deploy_controller(api: KubeAPI, node: str, service_ca: str, values: dict[str, Any] | None = None) -> None:
    """The chart's objects (DaemonSet from the project's image, RBAC, admission policies) created as rendered;
    the node labelled so that the DaemonSet wants it."""
    ensure_namespace(api, CONTROLLER_NAMESPACE, service_ca)
    merged = {"nodeSelector": {CONTROLLER_LABEL: "on"}, "image": {"pullPolicy": "IfNotPresent"},
              **(values or {})}  # fmt: skip
    for obj in chart.render(merged):
        api.create(object_path(obj), obj)
    set_controller_label(api, node, on=True)


def set_controller_label(api: KubeAPI, node: str, *, on: bool) -> None:
    api.merge_patch(
        f"/api/v1/nodes/{node}", {"metadata": {"labels": {CONTROLLER_LABEL: "on" if on else None}}}
    )


class Binder:
    """Stand-in for kube-scheduler: binds the controller's pending DaemonSet pods to the node."""

    def __init__(self, api: KubeAPI, node: str) -> None:
        self._api, self._node = api, node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="binder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                for pod in self._api.pods(CONTROLLER_NAMESPACE):
                    if pod["spec"].get("nodeName"):
                        continue
                    name = pod["metadata"]["name"]
                    target = {"apiVersion": "v1", "kind": "Node", "name": self._node}
                    binding = {
                        "apiVersion": "v1",
                        "kind": "Binding",
                        "metadata": {"name": name},
                        "target": target,
                    }
                    self._api.create(
                        f"/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods/{name}/binding", binding
                    )
            except (APIError, OSError):
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def controller_pods(api: KubeAPI) -> list[Obj]:
    return [p for p in api.pods(CONTROLLER_NAMESPACE) if not p["metadata"].get("deletionTimestamp")]


def controller_ready(api: KubeAPI) -> bool:
    return any(pod_ready(p) for p in controller_pods(api))


def pod_ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def mesh_pod(
    name: str, namespace: str, node: str, *, native_sidecar: bool = False, image: str = DEFAULT_IMAGE
) -> Obj:
    """A pod as istiod's injector leaves it (istio-init, istio-proxy), then rewritten by the project's
    `inject`: the waiter first, istio-init gone. The project's image stands in for the app and for Envoy."""
    proxy: Obj = {"name": "istio-proxy", "image": image, "command": SLEEP,
                  "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}  # fmt: skip
    init: Obj = {"name": ann.ISTIO_INIT_CONTAINER, "image": image, "args": ISTIO_INIT_ARGS,
                 "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}}}  # fmt: skip
    spec: Obj = {
        "nodeName": node,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 1,
        "initContainers": [init],
        "containers": [{"name": "app", "image": image, "command": SLEEP}],
        "volumes": [{"name": "istio-envoy", "emptyDir": {"medium": "Memory"}}],
    }
    if native_sidecar:
        spec["initContainers"].append({**proxy, "restartPolicy": "Always"})
    else:
        spec["containers"].append(proxy)
    metadata = {"name": name, "namespace": namespace, "annotations": {ann.SIDECAR_STATUS: INJECTED_STATUS}}
    options = InjectOptions(image=image, controller_namespace=CONTROLLER_NAMESPACE, timeout=600)
    rewritten = rewrite_pod(metadata, spec, options)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": rewritten.metadata,
        "spec": copy.deepcopy(rewritten.spec),
    }


def create_pod(api: KubeAPI, pod: Obj) -> Obj:
    return api.create(f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods", pod)


def app_running(pod: Obj) -> bool:
    """The app container runs: the waiter exited 0, i.e. it saw its own probe redirected (real packets)."""
    for status in pod.get("status", {}).get("containerStatuses", []):
        if status["name"] == "app" and "running" in status.get("state", {}):
            return True
    return False


def marked(pod: Obj) -> bool:
    return bool(pod["metadata"].get("annotations", {}).get(ann.STATUS) == ann.STATUS_INITIALIZED)


# -- the kernel's side --------------------------------------------------------------------------------------


def sandbox_pid(pod_uid: str) -> int | None:
    """The pause process of the pod's current sandbox (the newest one, if an old one is still dying)."""
    marker = f"pod{pod_uid}"
    found: list[tuple[float, int]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "pause" or marker not in (
                entry / "cgroup"
            ).read_text():
                continue
            found.append((entry.stat().st_mtime, int(entry.name)))
        except OSError:
            continue
    return max(found)[1] if found else None


RULE_READERS = (["nft", "list", "ruleset"], ["iptables-legacy-save"], ["ip6tables-legacy-save"])


def _read_rules(pid: int, argv: list[str]) -> str:
    done = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv],
                          capture_output=True, text=True, timeout=20, check=False)  # fmt: skip
    return done.stdout


def netns_rules(pid: int) -> str:
    """The netfilter rules of the network namespace of `pid`, in every rule system (read only)."""
    return "\n".join(_read_rules(pid, argv) for argv in RULE_READERS)


def has_rules(pid: int) -> bool:
    """Istio's redirect in the namespace of `pid` (stops at the first rule system that shows it)."""
    return any(captured(_read_rules(pid, argv)) for argv in RULE_READERS)


def captured(rules: str) -> bool:
    """Istio's redirect is installed (iptables chains, either backend, or our native nftables table)."""
    return "ISTIO_REDIRECT" in rules or "istio_pod_network" in rules


def istio_lines(rules: str) -> list[str]:
    """The lines of a ruleset that are Istio's or ours: never allowed in the node's own namespace."""
    return [line for line in rules.splitlines() if "ISTIO" in line or "istio_pod_network" in line]


def captured_now(api: KubeAPI, namespace: str, names: list[str]) -> dict[str, Obj] | None:
    """The pods by name when every named pod is marked, its app runs and Istio's rules are in its current
    sandbox; None otherwise."""
    pods = {p["metadata"]["name"]: p for p in api.pods(namespace)}
    for name in names:
        pod = pods.get(name)
        if pod is None or not (marked(pod) and app_running(pod)):
            return None
        pid = sandbox_pid(pod["metadata"]["uid"])
        if pid is None or not has_rules(pid):
            return None
    return pods


def wait_captured(api: KubeAPI, namespace: str, names: list[str], timeout: float) -> dict[str, Obj]:
    result: dict[str, Obj] = wait_for(
        f"{len(names)} pods captured in {namespace}",
        lambda: captured_now(api, namespace, names),
        timeout,
        0.5,
    )
    return result
