"""Pods shaped exactly as Istio's injector shapes them, through the real controller on the simulated node.

Sidecar mode (istio-init's arguments and env, rewritten by `inject`), CNI mode with istio-validation,
istio-proxy as a native sidecar, the OpenShift namespace-range uid, and `proxy.istio.io/overrides` ids:
for each, a process running as the proxy's uid:gid is never captured, an app's uid always is, and a
stand-in for Istio's istio-validation running as the proxy's uid passes (as uid 1337 it fails where the
proxy is another uid: the loop Envoy would be in if we exempted 1337).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipnc_lab.sim.cluster import SimCluster
from ipnc_lab.sim.controller import wait_for
from ipnc_lab.sim.node import SimPod
from ipnc_lab.sim.runtime import SYSTEM_PYTHON
from ipnc_lab.sim.traffic import Server, connect
from istio_pod_network_controller.install.injection import InjectOptions, rewrite_pod

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]
HERE = Path(__file__).parent
FIXTURES = HERE.parent / "fixtures" / "istio-pods"
OPENSHIFT_NS = {
    "openshift.io/sa.scc.uid-range": "1000620000/10000",
    "openshift.io/sa.scc.supplemental-groups": "1000620000/10000",
}
OPENSHIFT_ID = 1000629999
APP_ID = 1000620000
"""restricted-v2 runs app containers as the first uid of the namespace's range."""
REMOTE_PORT = 9090


def fixture(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def overridden_cni_pod() -> dict[str, Any]:
    """CNI mode with `proxy.istio.io/overrides` giving istio-proxy runAsUser 2000, runAsGroup 2001."""
    pod = fixture(HERE / "fixtures" / "istio-cni-mode-pod.yaml")
    for item in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
        if item["name"] in ("istio-proxy", "istio-validation"):
            item["securityContext"].update(runAsUser=2000, runAsGroup=2001)
    return pod


def sidecar_pod_after_inject() -> dict[str, Any]:
    pod = fixture(FIXTURES / "sidecar-openshift.yaml")
    result = rewrite_pod(pod["metadata"], pod["spec"], InjectOptions())
    return {"metadata": result.metadata, "spec": result.spec}


def validate(
    pod: SimPod, validator: Path, uid: int, gid: int, timeout: float
) -> subprocess.CompletedProcess[str]:
    assert pod.netns
    argv = [
        "ip", "netns", "exec", pod.netns.name,
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
        SYSTEM_PYTHON, str(validator), str(timeout),
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, check=False)


def outbound(pod: SimPod, gateway: str, uid: int, gid: int) -> str:
    """Who answered a connection to the node's remote listener: `remote`, or `envoy-out` when captured."""
    assert pod.netns
    reply = connect(pod.netns, gateway, REMOTE_PORT, uid=uid, gid=gid)
    assert reply.ok, reply
    return str(reply.label)


DNS_AGENT = """
import json, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 15053))
print("ready", flush=True)
while True:
    data, source = s.recvfrom(65535)
    s.sendto(json.dumps({"label": "dns-proxy", "token": data.decode().strip()}).encode() + b"\\n", source)
"""
"""Istio's agent answers captured DNS on 127.0.0.1:15053 as the proxy uid (its replies' conntrack zone
depends on that uid); this one answers with its label."""


@contextlib.contextmanager
def dns_agent(pod: SimPod, uid: int) -> Iterator[None]:
    assert pod.netns
    argv = [
        "ip", "netns", "exec", pod.netns.name,
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", SYSTEM_PYTHON, "-c", DNS_AGENT,
    ]  # fmt: skip
    agent = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "ready"
        yield
    finally:
        agent.kill()
        agent.wait()


def dns(pod: SimPod, server: str, uid: int) -> str:
    """Who answered a UDP query to port 53: the pod's DNS proxy (15053) when captured, else the server."""
    assert pod.netns
    reply = connect(pod.netns, server, 53, "udp", uid=uid, gid=uid)
    assert reply.ok, reply
    return str(reply.label)


def test_istio_shaped_pods_get_istios_capture(workdir: Path) -> None:
    validator = workdir / "istio_validation.py"
    shutil.copyfile(HERE / "istio_validation.py", validator)
    validator.chmod(0o644)
    with SimCluster() as cluster, Server() as server:
        node = cluster.add_node("ipnci")
        cluster.add_namespace("bookinfo", OPENSHIFT_NS)
        native = fixture(FIXTURES / "cni-native-sidecar-openshift.yaml")
        pods: list[tuple[SimPod, int, int]] = [
            (cluster.add_pod(node, "native", "bookinfo", shaped=native), OPENSHIFT_ID, OPENSHIFT_ID),
            (
                cluster.add_pod(node, "sidecar", "bookinfo", shaped=sidecar_pod_after_inject()),
                OPENSHIFT_ID,
                OPENSHIFT_ID,
            ),
            (cluster.add_pod(node, "overridden", shaped=overridden_cni_pod()), 2000, 2001),
            (
                cluster.add_pod(node, "stock", shaped=fixture(HERE / "fixtures" / "istio-cni-mode-pod.yaml")),
                1337,
                1337,
            ),
        ]
        controller = cluster.start_controller(node)
        controller.wait_ready()
        cluster.wait_initialized([pod for pod, _, _ in pods], 30, controller.log)

        for pod, uid, gid in pods:
            passed = validate(pod, validator, uid, gid, 5.0)
            assert passed.returncode == 0, (pod.name, passed.stdout, passed.stderr)
        as_1337 = validate(pods[0][0], validator, 1337, 1337, 2.0)
        assert as_1337.returncode == 126, as_1337.stdout  # 1337 is not this pod's proxy: no loop exemption

        server.add(node.node, "remote", REMOTE_PORT, bind6=None)
        server.add(node.node, "remote-dns", 53, "udp", bind6=None)
        for pod, _, _ in pods:
            server.add(pod.netns, "envoy-out", 15001, bind6=None)
        server.start()
        for pod, uid, gid in pods:
            assert outbound(pod, node.gateway, uid, gid) == "remote", pod.name  # the proxy is never captured
            assert outbound(pod, node.gateway, APP_ID, APP_ID) == "envoy-out", pod.name  # the app always is
        # DNS: ISTIO_META_DNS_CAPTURE in istio-proxy's env turns capture on in CNI mode, to every server.
        native_pod, stock_pod = pods[0][0], pods[3][0]
        with dns_agent(native_pod, OPENSHIFT_ID):
            assert dns(native_pod, node.gateway, APP_ID) == "dns-proxy"
            assert dns(native_pod, node.gateway, OPENSHIFT_ID) == "remote-dns"  # the proxy's own DNS goes out
        assert dns(stock_pod, node.gateway, APP_ID) == "remote-dns"  # no proxyMetadata: no DNS capture
        overridden = pods[2][0]
        assert outbound(overridden, node.gateway, 3000, 2001) == "remote"  # the proxy's gid alone exempts
        assert outbound(overridden, node.gateway, 2000, 3000) == "remote"  # so does its uid
        assert outbound(overridden, node.gateway, 1337, 1337) == "envoy-out"  # 1337 is an app uid here


def posing_as_proxy(path: Path, uid: int) -> dict[str, Any]:
    """A CNI-mode pod whose tenant set istio-proxy's (and istio-validation's) runAsUser/runAsGroup to the
    app's own uid: the bypass `run --ignore-pod-overrides` closes."""
    pod = fixture(path)
    for item in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
        if item["name"] in ("istio-proxy", "istio-validation"):
            item["securityContext"].update(runAsUser=uid, runAsGroup=uid)
    return pod


def test_gated_controller_admits_only_the_injectors_proxy_identity(workdir: Path) -> None:
    """With --ignore-pod-overrides, istio-proxy's runAsUser counts only as Istio's injector picks it: the top
    of an OpenShift namespace's range (exempt; istio-validation passes), never the app's own uid."""
    validator = workdir / "istio_validation.py"
    shutil.copyfile(HERE / "istio_validation.py", validator)
    validator.chmod(0o644)
    stock = HERE / "fixtures" / "istio-cni-mode-pod.yaml"
    with SimCluster() as cluster, Server() as server:
        node = cluster.add_node("ipncg")
        cluster.add_namespace("bookinfo", OPENSHIFT_NS)
        native = cluster.add_pod(
            node, "native", "bookinfo", shaped=fixture(FIXTURES / "cni-native-sidecar-openshift.yaml")
        )
        sidecar = cluster.add_pod(node, "sidecar", "bookinfo", shaped=sidecar_pod_after_inject())
        in_range = cluster.add_pod(node, "in-range", "bookinfo", shaped=posing_as_proxy(stock, APP_ID))
        posing = cluster.add_pod(node, "posing", shaped=posing_as_proxy(stock, 2000))
        controller = cluster.start_controller(node, ["--ignore-pod-overrides"])
        controller.wait_ready()
        cluster.wait_initialized([native, sidecar, in_range, posing], 30, controller.log)

        for pod in (native, sidecar):
            passed = validate(pod, validator, OPENSHIFT_ID, OPENSHIFT_ID, 5.0)
            assert passed.returncode == 0, (pod.name, passed.stdout, passed.stderr)

        server.add(node.node, "remote", REMOTE_PORT, bind6=None)
        for pod in (native, sidecar, in_range, posing):
            server.add(pod.netns, "envoy-out", 15001, bind6=None)
        server.start()
        for pod in (native, sidecar):
            assert outbound(pod, node.gateway, OPENSHIFT_ID, OPENSHIFT_ID) == "remote", pod.name
            assert outbound(pod, node.gateway, APP_ID, APP_ID) == "envoy-out", pod.name
        assert outbound(in_range, node.gateway, APP_ID, APP_ID) == "envoy-out"  # in the range, not its top
        assert outbound(posing, node.gateway, 2000, 2000) == "envoy-out"  # the app posing as the proxy
        assert outbound(posing, node.gateway, 1337, 1337) == "remote"  # the controller-wide proxy id applies

        for pod, uid in ((in_range, APP_ID), (posing, 2000)):
            wait_for(lambda p=pod: "PodOverrideIgnored" in cluster.reasons(p), 5, "override warning")
            (warning,) = [e for e in cluster.events(pod) if e["reason"] == "PodOverrideIgnored"]
            message = warning["message"]
            assert "container istio-proxy securityContext.runAsUser" in message, message
            assert "container istio-proxy securityContext.runAsGroup" in message, message
            assert str(uid) not in message  # our names of the fields, never the pod's values
        for pod in (native, sidecar):
            assert "PodOverrideIgnored" not in cluster.reasons(pod)
        assert controller.terminate() == 0
