"""The waiter from the image, as the injection code builds it: uid 1337, no capabilities, read-only root,
in a pod-like network namespace, with the downward-API annotations file mounted read-only (root)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from image_helpers import Containers, security_flags, volume_flags

from istio_pod_network_controller.install import injection
from istio_pod_network_controller.install.injection import InjectOptions
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.waiter import exitcodes
from proc_status import process_status

pytestmark = pytest.mark.root
ZERO_CAPS = "0000000000000000"


def waiter_in_pod(image: str, netns: str, podinfo: Path, timeout: str) -> tuple[list[str], list[str]]:
    """(podman flags, args) of the injected waiter container, its timeout shortened for the test."""
    options = InjectOptions(image=image)
    container = injection.waiter_container(options, injection.PODINFO_VOLUME, 1337, 1337, [])
    pod_spec = {"volumes": [injection.podinfo_volume()], "containers": [container]}
    args = list(container["args"])
    args[args.index("--timeout") + 1] = timeout
    flags = [
        *security_flags(pod_spec, container),
        *volume_flags(pod_spec, container, {injection.PODINFO_VOLUME: podinfo}),
        "--network", f"ns:/run/netns/{netns}",
    ]  # fmt: skip
    return flags, args


def downward_dir(tmp_path: Path, annotations: dict[str, str]) -> Path:
    """A downward-API volume as the kubelet writes it: key="value" lines, readable by the proxy uid."""
    folder = tmp_path / "podinfo"
    folder.mkdir()
    (folder / injection.PODINFO_FILE).write_text("".join(f'{k}="{v}"\n' for k, v in annotations.items()))
    os.chmod(folder, 0o755)  # noqa: S103 - the proxy uid reads it, as it reads a kubelet's volume
    os.chmod(folder / injection.PODINFO_FILE, 0o644)
    return folder


def rules_apply(netns: str) -> None:
    """The product's own `rules apply` from the host's venv (the controller's part, done by hand)."""
    argv = [sys.executable, "-m", "istio_pod_network_controller", "rules", "apply",
            "--netns", f"/run/netns/{netns}", "--backend", "legacy"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def test_waiter_blocks_without_rules_and_exits_once_applied(
    image: str, run_container: Containers, netns_name: str, tmp_path: Path
) -> None:
    flags, args = waiter_in_pod(image, netns_name, downward_dir(tmp_path, {}), "120")
    waiter = run_container.run(flags, args)
    waiter.wait_for_log("ECONNREFUSED")
    time.sleep(1)
    assert waiter.running(), waiter.logs()
    status = process_status(waiter.pid)
    assert status["Uid"].split() == ["1337"] * 4 and status["Gid"].split() == ["1337"] * 4, status
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[key] == ZERO_CAPS, (key, status)
    assert status["NoNewPrivs"] == "1", status
    assert waiter.inspect()["HostConfig"]["ReadonlyRootfs"] is True
    rules_apply(netns_name)
    assert waiter.wait(60) == exitcodes.CAPTURED, waiter.logs()
    log = waiter.logs()
    assert "traffic capture confirmed" in log and "token round trip ok" in log, log
    assert "Traceback" not in log


def test_waiter_refuses_a_forged_annotation(
    image: str, run_container: Containers, netns_name: str, tmp_path: Path
) -> None:
    forged = downward_dir(tmp_path, {ann.STATUS: ann.STATUS_INITIALIZED})
    flags, args = waiter_in_pod(image, netns_name, forged, "3")
    waiter = run_container.run(flags, args)
    assert waiter.wait(60) == exitcodes.TIMEOUT, waiter.logs()
    log = waiter.logs()
    assert "present but not trusted on its own" in log, log
    assert "traffic capture confirmed" not in log
