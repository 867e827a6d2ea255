"""The real-node harness's pure parts, in the default run (no binaries, no root needed)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from ipnc_lab.realnode import binaries
from ipnc_lab.realnode import workloads as wl
from ipnc_lab.realnode.recreate import Recreation
from istio_pod_network_controller.settings import annotations as ann


def test_without_binaries_the_tier_says_what_to_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(binaries.BIN_VARIABLE, raising=False)
    monkeypatch.delenv(binaries.ARCHIVE_VARIABLE, raising=False)
    assert not binaries.requested()
    with pytest.raises(binaries.RealNodeUnavailable, match=binaries.BIN_VARIABLE):
        binaries.locate(tmp_path)
    monkeypatch.setenv(binaries.BIN_VARIABLE, str(tmp_path))
    with pytest.raises(binaries.RealNodeUnavailable, match="lacks etcd, kube-apiserver"):
        binaries.locate(tmp_path)


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": "ns"}},
         "/api/v1/namespaces/ns/serviceaccounts"),
        ({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
          "metadata": {}}, "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"),
        ({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"namespace": "x"}},
         "/apis/apps/v1/namespaces/x/daemonsets"),
    ],
)  # fmt: skip
def test_object_path(obj: wl.Obj, path: str) -> None:
    assert wl.object_path(obj) == path


@pytest.mark.parametrize("native", [False, True])
def test_mesh_pod_is_the_injectors_output_rewritten_by_ours(native: bool) -> None:
    pod = wl.mesh_pod("web", "mesh", "node-a", native_sidecar=native)
    inits = [c["name"] for c in pod["spec"]["initContainers"]]
    containers = [c["name"] for c in pod["spec"]["containers"]]
    assert inits == ([ann.WAITER_CONTAINER, "istio-proxy"] if native else [ann.WAITER_CONTAINER])
    assert containers == (["app"] if native else ["app", "istio-proxy"])
    assert ann.ISTIO_INIT_CONTAINER not in inits
    assert pod["spec"]["nodeName"] == "node-a"
    assert ann.WAITER_CONTAINER in pod["metadata"]["annotations"][ann.SIDECAR_STATUS]


def test_rule_markers() -> None:
    assert wl.captured("table ip nat {\n\tchain ISTIO_REDIRECT {\n")
    assert wl.captured("table inet istio_pod_network {")
    assert not wl.captured("table ip nat {\n\tchain KUBE-SERVICES {\n")
    assert wl.istio_lines("a\n-A OUTPUT -j ISTIO_OUTPUT\nb") == ["-A OUTPUT -j ISTIO_OUTPUT"]


def test_latency_is_from_the_status_update_to_the_rules() -> None:
    run = Recreation("web", "10.0.0.2", 42)
    assert run.latency is None
    run.status_at, run.rules_at = 10.0, 10.25
    assert run.latency == pytest.approx(0.25)


def test_archive_gives_only_its_regular_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive = tmp_path / "bin.tar.xz"
    payload = tmp_path / "payload"
    payload.write_text("#!/bin/sh\n")
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(payload, arcname="server/bin/kubelet")
        tar.add(payload, arcname="../escape")
        link = tarfile.TarInfo("etcd")
        link.type, link.linkname = tarfile.SYMTYPE, "/bin/sh"
        tar.addfile(link)
    monkeypatch.delenv(binaries.BIN_VARIABLE, raising=False)
    monkeypatch.setenv(binaries.ARCHIVE_VARIABLE, str(archive))
    work = tmp_path / "work"
    with pytest.raises(
        binaries.RealNodeUnavailable, match=r"lacks etcd, kube-apiserver, kube-controller-manager$"
    ):
        binaries.locate(work)
    assert sorted(p.name for p in (work / "bin").iterdir()) == ["escape", "kubelet"]
    assert os.access(work / "bin" / "kubelet", os.X_OK)
    assert not (tmp_path / "escape").exists()
