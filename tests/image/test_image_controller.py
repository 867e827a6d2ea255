"""The controller (`run`) from the image with exactly the chart's DaemonSet container (securityContext,
capabilities, volumes, host /proc or host PID), against the API emulator on loopback (root).

The container shares the host's network only to reach the emulator on 127.0.0.1; the chart itself sets
hostNetwork: false, and the test checks the host's own rules are the same before and after.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from image_helpers import (
    Containers,
    render_chart,
    security_flags,
    volume_flags,
    with_arg,
    workload,
)

from ipnc_lab.sim.cluster import SimCluster, host_rules, unique_name
from ipnc_lab.sim.controller import free_port, wait_for
from proc_status import process_status

pytestmark = pytest.mark.root
CAP_BITS = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_PTRACE": 19, "SYS_ADMIN": 21}
KUBECONFIG = "/etc/ipnc/kubeconfig"


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def capability_mask(names: list[str]) -> str:
    return f"{sum(1 << CAP_BITS[name] for name in names):016x}"


@pytest.mark.parametrize("host_pid", [False, True], ids=["host-proc-mount", "host-pid"])
def test_controller_from_image_initializes_a_pod(
    image: str, run_container: Containers, host_pid: bool, tmp_path: Path
) -> None:
    pod_spec = workload(render_chart({"controller": {"hostPID": host_pid}}), "DaemonSet")["spec"]["template"][
        "spec"
    ]
    (container,) = pod_spec["containers"]
    assert container["image"] == image
    assert bool(pod_spec.get("hostPID")) is host_pid and pod_spec["hostNetwork"] is False
    added = container["securityContext"]["capabilities"]["add"]
    before = host_rules()
    with SimCluster() as cluster:
        node = cluster.add_node()
        pod = cluster.add_pod(node, unique_name("app"))
        port = free_port()
        args = [
            *with_arg(container["args"], "--listen-address", f"127.0.0.1:{port}"),
            f"--kubeconfig={KUBECONFIG}",
        ]
        flags = [
            *security_flags(pod_spec, container),
            *volume_flags(pod_spec, container),
            "-v", f"{cluster.kubeconfig(node=node.name)}:{KUBECONFIG}:ro",
            "-e", f"NODE_NAME={node.name}",
            "--network", "host",
        ]  # fmt: skip
        controller = run_container.run(flags, args)
        cluster.wait_initialized([pod], 90, controller.logs)
        assert cluster.verify(pod).in_place, controller.logs()
        wait_for(lambda: readyz(port) == 200, 30, f"/readyz 200\n{controller.logs()}")
        status = process_status(controller.pid)
        assert status["Uid"].split() == ["0"] * 4, status
        # Confined at start: CAP_SYS_PTRACE is the namespace broker's alone (its child), never regained.
        kept = [cap for cap in added if cap != "SYS_PTRACE"]
        assert status["CapBnd"] == capability_mask(added), status
        assert (status["CapEff"], status["CapPrm"], status["NoNewPrivs"]) == (capability_mask(kept),) * 2 + (
            "1",
        )
        (broker,) = Path(f"/proc/{controller.pid}/task/{controller.pid}/children").read_text().split()
        assert process_status(int(broker))["CapEff"] == capability_mask(["SYS_PTRACE"])
        state = controller.inspect()
        assert state["HostConfig"]["Privileged"] is False and state["HostConfig"]["ReadonlyRootfs"] is True
        assert "Traceback" not in controller.logs()
    assert host_rules() == before
