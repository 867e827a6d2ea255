"""The system kubectl against the emulator's kubeconfig, over plain http and TLS."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ipnc_lab.localapi import PODS, ThreadedServer, User

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def kubectl(
    kubeconfig: Path, *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=30,
        input=stdin,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


def get_pod(kubeconfig: Path, name: str) -> dict[str, Any]:
    return json.loads(kubectl(kubeconfig, "get", "pod", name, "-o", "json").stdout)


@pytest.fixture(params=["http", "https"])
def server(request: pytest.FixtureRequest) -> ThreadedServer:
    fixture = "threaded" if request.param == "http" else "threaded_tls"
    handle: ThreadedServer = request.getfixturevalue(fixture)
    assert handle.url.startswith(request.param + "://")
    return handle


def test_kubectl_crud_and_patches(server: ThreadedServer, tmp_path: Path) -> None:
    kc = server.kubeconfig_path
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: {app: web}\n"
        "spec:\n  containers:\n  - {name: app, image: busybox}\n  - {name: side, image: s1}\n"
    )
    assert kubectl(kc, "create", "-f", str(manifest)).stdout.strip() == "pod/web created"
    again = kubectl(kc, "create", "-f", str(manifest), check=False)
    assert again.returncode != 0
    assert 'pods "web" already exists' in again.stderr
    assert kubectl(kc, "get", "pods").stdout.split()[:3] == ["NAME", "AGE", "web"]
    assert kubectl(kc, "get", "pods", "-l", "app=web", "-o", "name").stdout.split() == ["pod/web"]
    assert kubectl(kc, "get", "pods", "-l", "app!=web", "-o", "name").stdout.split() == []
    assert kubectl(
        kc, "get", "pods", "-A", "--field-selector", "metadata.name=web", "-o", "name"
    ).stdout.split() == ["pod/web"]

    kubectl(kc, "label", "pod", "web", "tier=front")
    kubectl(kc, "annotate", "pod", "web", "note=hello")
    pod = get_pod(kc, "web")
    assert pod["metadata"]["labels"] == {"app": "web", "tier": "front"}
    assert pod["metadata"]["annotations"] == {"note": "hello"}
    kubectl(kc, "label", "pod", "web", "tier-")
    assert get_pod(kc, "web")["metadata"]["labels"] == {"app": "web"}

    kubectl(kc, "patch", "pod", "web", "--type", "merge", "-p", '{"metadata":{"labels":{"m":"1"}}}')
    kubectl(
        kc,
        "patch",
        "pod",
        "web",
        "--type",
        "strategic",
        "-p",
        '{"spec":{"containers":[{"name":"app","image":"busybox:2"}]}}',
    )
    kubectl(
        kc,
        "patch",
        "pod",
        "web",
        "--type",
        "json",
        "-p",
        '[{"op":"add","path":"/metadata/labels/j","value":"2"}]',
    )
    pod = get_pod(kc, "web")
    assert pod["metadata"]["labels"] == {"app": "web", "m": "1", "j": "2"}
    assert [(c["name"], c["image"]) for c in pod["spec"]["containers"]] == [
        ("app", "busybox:2"),
        ("side", "s1"),
    ]
    failed = kubectl(
        kc,
        "patch",
        "pod",
        "web",
        "--type",
        "json",
        "-p",
        '[{"op":"test","path":"/metadata/labels/j","value":"9"}]',
        check=False,
    )
    assert failed.returncode != 0
    assert "is invalid" in failed.stderr

    missing = kubectl(kc, "get", "pod", "nope", check=False)
    assert missing.returncode != 0
    assert 'pods "nope" not found' in missing.stderr
    assert kubectl(kc, "delete", "pod", "web", "--wait=false").stdout.strip() == 'pod "web" deleted'
    assert server.store.objects(PODS) == []


def test_kubectl_get_watch(server: ThreadedServer) -> None:
    kc = server.kubeconfig_path
    kubectl(kc, "run", "first", "--image=busybox", "--restart=Never")
    assert KUBECTL is not None
    proc = subprocess.Popen(
        [KUBECTL, "--kubeconfig", str(kc), "get", "pods", "-w", "-o", "name", "--request-timeout=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while server.store.watcher_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.store.watcher_count() == 1
        kubectl(kc, "run", "second", "--image=busybox", "--restart=Never")
        server.faults.drop_watches()  # kubectl ends its watch when the server closes it
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.split() == ["pod/first", "pod/second"]


def test_kubectl_rbac_and_can_i(threaded_tls: ThreadedServer, tmp_path: Path) -> None:
    user = threaded_tls.add_user(
        "viewer",
        "viewer-token",
        [{"verbs": ["get", "list"], "resources": ["pods"], "namespaces": ["default"]}],
    )
    kc = threaded_tls.api.write_kubeconfig(tmp_path / "viewer", user)
    assert kubectl(kc, "get", "pods", "-o", "name").returncode == 0
    denied = kubectl(kc, "get", "pods", "-A", check=False)
    assert denied.returncode != 0
    assert (
        'pods is forbidden: User "viewer" cannot list resource "pods" in API group "" at the cluster scope'
        in denied.stderr
    )
    assert kubectl(kc, "auth", "can-i", "list", "pods").stdout.strip() == "yes"
    no = kubectl(kc, "auth", "can-i", "delete", "pods", check=False)
    assert (no.returncode, no.stdout.strip()) == (1, "no")
    bad = threaded_tls.api.write_kubeconfig(tmp_path / "bad", User("ghost", "unknown-token"))
    unauthorized = kubectl(bad, "get", "pods", check=False)
    assert unauthorized.returncode != 0
    assert "Unauthorized" in unauthorized.stderr or "provide credentials" in unauthorized.stderr
