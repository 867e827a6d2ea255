"""`status POD` against the API emulator: each verdict, the spec with the source of every setting, --o json,
and `rules verify --pod` on a real simulated node (the pod's own annotations, never the defaults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipnc_lab.localapi import LocalAPIServer
from ipnc_lab.localapi.resources import CORE_EVENTS, NAMESPACES, PODS
from ipnc_lab.localapi.server import ThreadedServer
from ipnc_lab.sim.cluster import INJECTED_STATUS, SimCluster
from ipnc_lab.sim.controller import free_port
from istio_pod_network_controller.cli import exitcodes
from istio_pod_network_controller.cli.spec_options import env_name, flag_name
from istio_pod_network_controller.controller import events as ev
from istio_pod_network_controller.controller.decision import candidate_digests
from istio_pod_network_controller.controller.view import PodView
from istio_pod_network_controller.diagnose import explain as ex
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import SETTINGS, build_spec

CTL_ARGS = [
    "run",
    "--proc-root=/host/proc",
    "--exclude-outbound-ports=5432",
    "--excluded-namespaces=kube-system,skip",
]
CTL_ENV = [
    {"name": "IPNC_CAPTURE_DNS", "value": "true"},
    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
]
CTL_DEFAULTS = {"exclude_outbound_ports": "5432", "capture_dns": "true"}
LABELS = {
    "app.kubernetes.io/name": "istio-pod-network-controller",
    "app.kubernetes.io/component": "controller",
}


def mesh_pod(
    name: str, namespace: str, node: str, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": {ann.SIDECAR_STATUS: INJECTED_STATUS, **(annotations or {})}},
        "spec": {"nodeName": node, "initContainers": [{"name": ann.WAITER_CONTAINER, "image": "ipnc"}],
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}]},
    }  # fmt: skip


def controller_pod(node: str, ready: bool) -> dict[str, Any]:
    return {
        "metadata": {"name": f"ipnc-{node}", "namespace": "istio-system", "labels": LABELS},
        "spec": {"nodeName": node, "containers": [{"name": "controller", "image": "x", "args": CTL_ARGS,
                                                   "env": CTL_ENV}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}],
                   "containerStatuses": [{"name": "controller", "restartCount": 2}]},
    }  # fmt: skip


@pytest.fixture(scope="module")
def api() -> Iterator[ThreadedServer]:
    server = LocalAPIServer().start_in_thread()
    store = server.store
    try:
        for name in ("shop", "skip", "istio-system"):
            store.create(NAMESPACES, None, {"metadata": {"name": name}})
        store.create(PODS, "istio-system", controller_pod("node-1", ready=True))
        store.create(PODS, "istio-system", controller_pod("node-3", ready=False))
        notes = {ann.EXCLUDE_INBOUND_PORTS: "9000"}
        digest = sorted(candidate_digests(build_spec(notes, CTL_DEFAULTS)))[0]
        marked = {**notes, ann.STATUS: ann.STATUS_INITIALIZED, ann.SPEC_DIGEST: digest}
        web = store.create(PODS, "shop", mesh_pod("web", "shop", "node-1", marked))
        store.create(
            CORE_EVENTS,
            "shop",
            ev.build_event(PodView.of(web), ev.NORMAL, ev.INITIALIZED, "installed", "node-1"),
        )
        store.create(PODS, "shop", {**mesh_pod("plain", "shop", "node-1"), "metadata": {"name": "plain"}})
        store.create(
            PODS, "shop", mesh_pod("bad", "shop", "node-1", {ann.INCLUDE_INBOUND_PORTS: "80,\x1b[31mx"})
        )
        store.create(PODS, "shop", mesh_pod("lonely", "shop", "node-2"))
        store.create(PODS, "shop", mesh_pod("waiting", "shop", "node-3"))
        store.create(PODS, "skip", mesh_pod("excluded", "skip", "node-1"))
        store.create(
            PODS, "shop", mesh_pod("stale", "shop", "node-1", {**marked, ann.EXCLUDE_INBOUND_PORTS: "1"})
        )
        yield server
    finally:
        server.stop()


def status(
    api: ThreadedServer, *args: str, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    config = kubeconfig or api.kubeconfig_path
    return subprocess.run(
        [sys.executable, "-m", "istio_pod_network_controller", "status", *args, "--kubeconfig", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_an_initialized_pod_on_one_screen(api: ThreadedServer) -> None:
    done = status(api, "web", "-n", "shop")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Pod:        shop/web  (node node-1, phase Running)" in out
    assert "Selected:   yes: injected sidecar with the istio-pod-network-wait init container" in out
    assert "matches the spec below" in out
    lines = {
        line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 2
    }
    assert "annotation traffic.sidecar.istio.io/excludeInboundPorts" in lines["exclude_inbound_ports"]
    assert "controller flag --exclude-outbound-ports" in lines["exclude_outbound_ports"]
    assert "controller env IPNC_CAPTURE_DNS" in lines["capture_dns"]
    assert "built-in default" in lines["outbound_port"]
    assert "Controller: istio-system/ipnc-node-1 on node-1: Ready (Running, 2 restarts)" in out
    assert "Normal   Initialized: installed" in out
    assert "Verdict:    initialized: capture rules installed for this spec" in out
    assert "rules verify --pod shop/web --proc-root /host/proc" in out
    assert len(out.splitlines()) <= 40


def test_json_output_carries_the_same_facts(api: ThreadedServer) -> None:
    data = json.loads(status(api, "shop/web", "-o", "json").stdout)
    assert data["selected"] is True and data["reason"] == "injected-sidecar-with-waiter"
    assert data["marked"] is True and data["digest_matches"] is True
    assert data["controllers"][0]["ready"] is True
    assert {s["field"]: s["value"] for s in data["settings"]}["exclude_outbound_ports"] == "5432"


@pytest.mark.parametrize(
    ("pod", "verdict", "advice"),
    [
        ("plain", "not selected", "inject the sidecar with the waiter"),
        (
            "bad",
            "invalid interception settings",
            "fix the value: annotation traffic.sidecar.istio.io/include",
        ),
        ("lonely", "no controller pod runs on node node-2", "get daemonset"),
        ("waiting", "the controller on node-3 is not ready", "istio-pod-network-controller check"),
        ("excluded", "not selected", "--excluded-namespaces"),
        ("stale", "initialized, but with a different spec", "Reconfigured"),
    ],
)
def test_each_verdict_says_what_to_do(api: ThreadedServer, pod: str, verdict: str, advice: str) -> None:
    namespace = "skip" if pod == "excluded" else "shop"
    done = status(api, pod, "-n", namespace)
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("Verdict:")]
    assert verdict in line
    assert advice in done.stdout.split("Next:", 1)[1]
    assert "\x1b" not in done.stdout  # tenant bytes are escaped, never sent to the terminal verbatim


def test_api_failures_are_one_line(api: ThreadedServer, tmp_path: Path) -> None:
    done = status(api, "nope", "-n", "shop")
    assert done.returncode == exitcodes.NOT_FOUND and done.stderr.strip() == "error: pod shop/nope: not found"
    nobody = api.add_user("nobody", "nobody-token", [])
    done = status(api, "web", "-n", "shop", kubeconfig=api.api.write_kubeconfig(tmp_path / "kc", nobody))
    assert done.returncode == exitcodes.DENIED and "said 403" in done.stderr
    gone = tmp_path / "gone"
    gone.write_text(api.kubeconfig_path.read_text().replace(api.url, f"https://127.0.0.1:{free_port()}"))
    done = status(api, "web", "-n", "shop", kubeconfig=gone)
    assert (
        done.returncode == exitcodes.UNREACHABLE
        and "cannot reach the API server https://127.0.0.1:" in done.stderr
    )
    for failed in (done,):
        assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr


def test_attribution_agrees_with_build_spec() -> None:
    """Every field attributed to an annotation or a default holds the value that layer alone gives it."""
    notes = {ann.ENVOY_PORT: "15100", ann.EXCLUDE_INBOUND_PORTS: "9", ann.KUBEVIRT_INTERFACES: "net1"}
    defaults = {"outbound_port": "15200", "capture_dns": "true", "proxy_uid": "1000"}
    sources = {name: f"controller flag {flag_name(name)}" for name in defaults}
    origin = ex.attribute(notes, sources)
    full = build_spec(notes, defaults).describe()
    assert full["outbound_port"] == "15100" and origin["outbound_port"].startswith("annotation")
    assert origin["reroute_virtual_interfaces"] == f"annotation {ann.KUBEVIRT_INTERFACES}"
    for field, source in origin.items():
        if source == "built-in default":
            assert full[field] == build_spec({}).describe()[field], field
        elif source.startswith("controller flag"):
            assert full[field] == build_spec({}, defaults).describe()[field], field


def test_controller_settings_from_its_pod() -> None:
    settings = ex.controller_settings(controller_pod("n", True), flag_name, env_name)
    assert settings.defaults == CTL_DEFAULTS
    assert settings.selection.excluded_namespaces == frozenset({"kube-system", "skip"})
    legacy = controller_pod("n", True)
    legacy["spec"]["containers"][0]["args"] = [
        "run",
        "--istio-exclude-inbound-ports",
        "7",
        "--no-select-injected",
    ]
    parsed = ex.controller_settings(legacy, flag_name, env_name)
    assert parsed.defaults["exclude_inbound_ports"] == "7" and not parsed.selection.injected
    assert {s.name for s in SETTINGS} >= set(parsed.defaults)


@pytest.mark.root
@pytest.mark.timeout(90)
def test_rules_verify_pod_reads_the_pods_own_annotations() -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipncv")
        pod = cluster.add_pod(node, "mesh", annotations={ann.EXCLUDE_OUTBOUND_PORTS: "5432"})
        ctl = cluster.start_controller(node, ["--exclude-inbound-ports", "9000"])
        ctl.wait_ready()
        cluster.wait_initialized([pod], 20, ctl.log)
        admin = ["--kubeconfig", str(cluster.api.kubeconfig_path)]
        # The controller as the API sees its DaemonSet pod: verify takes its flags as the defaults.
        cluster.store.create(NAMESPACES, None, {"metadata": {"name": "istio-system"}})
        ctl_pod = controller_pod(node.name, ready=True)
        ctl_pod["spec"]["containers"][0].update(args=["run", "--exclude-inbound-ports=9000"], env=[])
        cluster.store.create(PODS, "istio-system", ctl_pod)

        def rules(*args: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "istio_pod_network_controller", "rules", *args]
            return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

        done = rules("verify", "--pod", "default/mesh", *admin)
        assert done.returncode == exitcodes.OK, done.stdout + done.stderr
        assert done.stdout.strip().endswith(": in place")
        pid = str(pod.processes[0].pid)
        assert rules("verify", "--pid", pid, "--pod", "default/mesh", *admin).returncode == exitcodes.OK
        elsewhere = ["--controller-namespace", "nowhere"]  # no controller pod found: its flags are unknown
        assert rules("verify", "--pod", "default/mesh", *admin, *elsewhere).returncode == exitcodes.DRIFT
        given = ["--exclude-inbound-ports", "9000"]
        assert rules("verify", "--pod", "default/mesh", *admin, *elsewhere, *given).returncode == exitcodes.OK
        # Without the pod (whose host IP proves the PID's namespace is not the node's) a PID's namespace is
        # refused where PID 1's cannot be read (as here); the override says the operator checked.
        override = [] if os.access("/proc/1/ns/net", os.R_OK) else ["--allow-host-netns"]
        # The defaults alone call the pod's correct rules drift: that is why they are refused by default.
        assert rules("verify", "--pid", pid, "--flags-only", *override).returncode == exitcodes.DRIFT
        ctl.terminate()
        assert rules("clean", "--pid", pid, *override).returncode == 0
        done = rules("verify", "--pod", "default/mesh", *admin)
        assert done.returncode == exitcodes.NOT_INSTALLED and "not installed" in done.stdout
        done = rules("verify", "--pod", "default/missing", *admin)
        assert done.returncode == exitcodes.NOT_FOUND and "pod default/missing: not found" in done.stderr
