"""`make image-archive` for clusters without a registry: a real containerd (its own root, state and socket in
a temporary folder) imports the archive with `ctr -n k8s.io images import` under the chart's image name and
runs it with the image's own entrypoint (root)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_helpers import ROOT, podman

from ipnc_lab.sim.cluster import unique_name
from ipnc_lab.sim.controller import wait_for

pytestmark = pytest.mark.root
CONFIG = """version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
"""


def archive_path(image: str) -> Path:
    return ROOT / "build" / "image" / f"istio-pod-network-controller-{image.rsplit(':', 1)[1]}.tar"


@pytest.fixture
def ctr() -> Iterator[list[str]]:
    """`ctr` bound to a private containerd (k8s.io namespace); the daemon and its files go afterwards."""
    if shutil.which("containerd") is None:
        pytest.skip("containerd is not installed: run `make image-archive`")
    base = Path(tempfile.mkdtemp(prefix="ipnc-ctd-"))
    (base / "config.toml").write_text(CONFIG.format(base=base))
    with (base / "containerd.log").open("wb") as log:
        daemon = subprocess.Popen(
            ["containerd", "--config", str(base / "config.toml")], stdout=log, stderr=subprocess.STDOUT
        )
    client = ["ctr", "--address", str(base / "containerd.sock"), "-n", "k8s.io"]
    try:
        wait_for(
            lambda: subprocess.run([*client, "version"], capture_output=True, check=False).returncode == 0,
            30,
            "containerd answering",
            0.1,
        )
        yield client
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-R", str(base / "root")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_containerd_imports_and_runs_the_archive(image: str, ctr: list[str]) -> None:
    archive = archive_path(image)
    if not archive.exists():
        pytest.skip(f"{archive} is missing: run `make image-archive`")
    subprocess.run([*ctr, "images", "import", str(archive)], check=True, capture_output=True, timeout=300)
    listed = subprocess.run([*ctr, "images", "ls"], check=True, capture_output=True, text=True).stdout
    (line,) = [row for row in listed.splitlines() if row.split()[0] == image]
    manifest = json.loads(
        subprocess.run([*ctr, "content", "get", line.split()[2]], check=True, capture_output=True).stdout
    )
    image_id = json.loads(podman("image", "inspect", image).stdout)[0]["Id"]
    assert manifest["config"]["digest"] == f"sha256:{image_id}", "stale archive: run `make image-archive`"
    name = unique_name("ipnc-ctr-")
    ran = subprocess.run(
        [*ctr, "run", "--rm", image, name], capture_output=True, text=True, timeout=120, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert "Usage: istio-pod-network-controller" in ran.stdout and "webhook" in ran.stdout
