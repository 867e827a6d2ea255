"""`ipnc-lab local-apiserver` as a subprocess, driven by kubectl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .test_kubectl import KUBECTL, kubectl

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipnc_lab", "local-apiserver", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("url: "):
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no url printed: {line!r} {err}")
    return proc, line.removeprefix("url: ").strip()


def stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return proc.returncode


@pytest.mark.parametrize("tls", [False, True])
def test_cli_serves_kubectl_and_exits_cleanly_on_sigterm(tmp_path: Path, tls: bool) -> None:
    kc = tmp_path / "kubeconfig"
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text(
        "users:\n- name: viewer\n  token: view-me\n  rules:\n  - {verbs: [list], resources: [pods]}\n"
    )
    args = [
        "--listen",
        "127.0.0.1:0",
        "--kubeconfig",
        str(kc),
        "--rbac",
        str(rbac),
        "--token",
        "admin-secret",
    ]
    proc, url = start(*args, *(["--tls"] if tls else []))
    try:
        assert url.startswith("https://127.0.0.1:" if tls else "http://127.0.0.1:")
        assert "admin-secret" in kc.read_text()
        kubectl(kc, "create", "namespace", "demo")
        kubectl(kc, "run", "p", "-n", "demo", "--image=busybox", "--restart=Never")
        pods = json.loads(kubectl(kc, "get", "pods", "-n", "demo", "-o", "json").stdout)
        assert [p["metadata"]["name"] for p in pods["items"]] == ["p"]
        assert json.loads(kubectl(kc, "get", "--raw", "/version").stdout)["major"] == "1"
    finally:
        code = stop(proc)
    assert code == 0


def test_cli_reports_errors_without_traceback(tmp_path: Path) -> None:
    for args in (
        ["--listen", "nonsense", "--kubeconfig", str(tmp_path / "k")],
        ["--kubeconfig", str(tmp_path / "k"), "--rbac", str(tmp_path / "missing.yaml")],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "ipnc_lab", "local-apiserver", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode != 0
        assert "Error" in result.stderr
        assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("users:\n- name: x\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ipnc_lab",
            "local-apiserver",
            "--kubeconfig",
            str(tmp_path / "k"),
            "--rbac",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "every user needs a name and a token" in result.stderr
    assert "Traceback" not in result.stderr
