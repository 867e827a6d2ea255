"""A compromised controller, from the image with the chart's DaemonSet container (root).

The attacker's shell is started the way an RCE in the controller starts one: by the controller process
itself (gdb makes it call system(3)), so the shell inherits what the controller holds after start. From that
shell, reading another container's token file and its environment, and writing a host file reached
through /host/proc/PID/root, all fail; the controller keeps capturing pods (packets prove it). The same
script from `podman exec` (a new process in the container, with the container's capabilities but not the
controller's confinement) succeeds, so the attack is real and the test can fail.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from image_helpers import (
    Container,
    Containers,
    podman,
    render_chart,
    security_flags,
    volume_flags,
    with_arg,
    workload,
)

from ipnc_lab.sim.cluster import CONTROLLER_USER, SimCluster, host_rules, unique_name
from ipnc_lab.sim.controller import free_port
from ipnc_lab.sim.node import SimNode, SimPod
from ipnc_lab.sim.traffic import Server, connect
from proc_status import process_status

pytestmark = pytest.mark.root
KUBECONFIG = "/etc/ipnc/kubeconfig"
SYS_PTRACE = 1 << 19
ATTACK = """
if cat {proc}/{victim}/root/tmp/token; then echo ATTACK token=read; else echo ATTACK token=denied; fi
if tr '\\0' '\\n' < {proc}/{victim}/environ | grep -q {secret}; then echo ATTACK environ=read
else echo ATTACK environ=denied; fi
if echo pwned >> {proc}/{host}/root{scratch}; then echo ATTACK write=done
else echo ATTACK write=denied; fi
if grep -q sleep {proc}/{victim}/cmdline; then echo ATTACK cmdline=read; else echo ATTACK cmdline=denied; fi
if grep -q sleep {proc}/{victim}/maps; then echo ATTACK maps=read; else echo ATTACK maps=denied; fi
if mount -t tmpfs none /tmp; then echo ATTACK mount=done; else echo ATTACK mount=denied; fi
echo ATTACK end
"""


def attack_script(proc: str, victim: int, host: int, scratch: Path, secret: str) -> str:
    return ATTACK.format(proc=proc, victim=victim, host=host, scratch=scratch, secret=secret)


def verdicts(output: str) -> dict[str, str]:
    return dict(
        line.split(" ", 1)[1].split("=", 1)
        for line in output.splitlines()
        if line.startswith("ATTACK ") and "=" in line
    )


def shell_from_controller(controller: Container, script: str) -> str:
    """Make the controller process run `sh` with `script` (system(3) through gdb); returns what it printed."""
    encoded = base64.b64encode(script.encode()).decode()
    pid = controller.pid
    gdb = [
        "gdb", "-p", str(pid), "-batch", "-nx",
        "-ex", f"set sysroot /proc/{pid}/root",
        "-ex", f'call (int)system("echo {encoded} | base64 -d | sh 2>&1")',
    ]  # fmt: skip
    done = subprocess.run(gdb, capture_output=True, text=True, timeout=120, check=False)
    assert "$1 = " in done.stdout, (
        f"gdb could not make the controller run the shell:\n{done.stdout}{done.stderr}"
    )
    controller.wait_for_log("ATTACK end", 30)
    return controller.logs()


def dial(node: SimNode, pod: SimPod, port: int) -> str:
    assert pod.ip
    reply = connect(node.node, pod.ip, port)
    return f"{reply.label} {reply.orig[1] if reply.orig else 0}" if reply.ok else f"error {reply.error}"


@pytest.mark.skipif(
    shutil.which("gdb") is None, reason="gdb starts the attacker's shell inside the controller"
)
@pytest.mark.parametrize("host_pid", [False, True], ids=["host-proc-mount", "host-pid"])
def test_a_shell_in_the_controller_reads_no_container_file_writes_no_host_file_and_capture_works(
    image: str, run_container: Containers, tmp_path: Path, host_pid: bool
) -> None:
    """With hostPID the node's /proc is the container's own, which the controller may read: other
    processes' cmdline and maps are readable then (docs/security.md), their environment is not."""
    pod_spec = workload(render_chart({"controller": {"hostPID": host_pid}}), "DaemonSet")["spec"]["template"][
        "spec"
    ]
    (container,) = pod_spec["containers"]
    secret, token = unique_name("secret"), unique_name("token")
    scratch = tmp_path / unique_name("host-file")
    scratch.write_text("the node's\n")
    before = host_rules()
    victim = run_container.run(
        ["--network", "none", "-e", f"SECRET={secret}"],
        ["-c", f"echo {token} > /tmp/token && exec sleep 600"],
        entrypoint="/bin/sh",
    )
    host_process = subprocess.Popen(["sleep", "600"])
    try:
        with SimCluster() as cluster, Server() as server:
            node = cluster.add_node()
            first = cluster.add_pod(node, unique_name("app"))
            assert first.netns
            server.add(first.netns, "app", 8080, bind6=None)
            server.add(first.netns, "envoy-in", 15006, bind6=None)
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
            server.start()
            controller = run_container.run(flags, args)
            cluster.wait_initialized([first], 90, controller.logs)
            assert dial(node, first, 8080) == "envoy-in 8080", controller.logs()
            controller_caps = int(process_status(controller.pid)["CapEff"], 16)
            assert not controller_caps & SYS_PTRACE, "the confined controller holds no CAP_SYS_PTRACE"

            script = attack_script(
                "/proc" if host_pid else "/host/proc", victim.pid, host_process.pid, scratch, secret
            )
            confined = verdicts(shell_from_controller(controller, script))
            # with hostPID the node's /proc is the container's own, which the tools need to read
            seen = "read" if host_pid else "denied"
            assert confined == {
                "token": "denied",
                "environ": "denied",
                "write": "denied",
                "cmdline": seen,
                "maps": seen,
                "mount": "denied",
            }
            assert token not in controller.logs()
            assert scratch.read_text() == "the node's\n"

            # The controller still captures: a pod created after the attack, proven with packets.
            second = cluster.add_pod(node, unique_name("app"))
            assert second.netns
            server.add(second.netns, "app", 8080, bind6=None)
            server.add(second.netns, "envoy-in", 15006, bind6=None)
            cluster.wait_initialized([second], 60, controller.logs)
            assert dial(node, second, 8080) == "envoy-in 8080", controller.logs()
            assert cluster.verify(second).in_place

            # The same script unconfined (a new process in the same container) succeeds: the attack is real.
            exec_shell = podman("exec", controller.name, "/bin/sh", "-c", script, check=False)
            unconfined = verdicts(exec_shell.stdout)
            assert (unconfined["token"], unconfined["write"]) == ("read", "done"), exec_shell.stdout
            assert token in exec_shell.stdout and scratch.read_text() == "the node's\npwned\n"
            assert "Traceback" not in controller.logs()
    finally:
        host_process.kill()
        host_process.wait()
    assert host_rules() == before


def project_token(account: Path, generation: int, token: str, ca: bytes) -> None:
    """The kubelet's projected-volume layout: files in a timestamped directory, `..data` swapped atomically
    to the new one, the visible names linking through `..data`."""
    data = account / f"..2026_12_07_00_00_0{generation}.000000000"
    data.mkdir()
    (data / "token").write_text(token)
    (data / "ca.crt").write_bytes(ca)
    (data / "namespace").write_text("istio-pod-network-controller")
    swap = account / "..data_tmp"
    swap.symlink_to(data.name)
    swap.rename(account / "..data")
    for name in ("token", "ca.crt", "namespace"):
        if not (account / name).is_symlink():
            (account / name).symlink_to(f"..data/{name}")


def test_in_cluster_token_rotation_is_followed_by_the_confined_controller(
    image: str, run_container: Containers, tmp_path: Path
) -> None:
    """The service-account token, rotated as the kubelet does it (new directory, `..data` swapped, the old
    token revoked), is re-read by the confined controller: the next pod is marked with the new token."""
    pod_spec = workload(render_chart(), "DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    with SimCluster(tls=True) as cluster:
        node = cluster.add_node()
        old, new = unique_name("old"), unique_name("new")
        cluster.add_token(old, node=node.name)
        ca = cluster.api.api.ca_pem
        assert ca is not None
        account = tmp_path / "serviceaccount"
        account.mkdir()
        project_token(account, 1, old, ca)
        host, port = cluster.api.url.removeprefix("https://").rsplit(":", 1)
        first = cluster.add_pod(node, unique_name("app"))
        flags = [
            *security_flags(pod_spec, container),
            *volume_flags(pod_spec, container),
            "-v", f"{account}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            "-e", f"KUBERNETES_SERVICE_HOST={host}", "-e", f"KUBERNETES_SERVICE_PORT={port}",
            "-e", f"NODE_NAME={node.name}",
            "--network", "host",
        ]  # fmt: skip
        args = with_arg(container["args"], "--listen-address", f"127.0.0.1:{free_port()}")
        controller = run_container.run(flags, args)
        cluster.wait_initialized([first], 90, controller.logs)
        assert "confined: Landlock ABI" in controller.logs()

        cluster.add_token(new, node=node.name)
        project_token(account, 2, new, ca)
        cluster.api.api.revoke_token(old)
        cluster.api.requests.clear()
        second = cluster.add_pod(node, unique_name("app"))
        cluster.wait_initialized([second], 60, controller.logs)
        # The old token was revoked before this pod existed: its mark was written with the new token, which
        # the client can only have read from the rotated files (whether it re-read on a 401 or before).
        patches = [(r.status, r.user) for r in cluster.api.requests.records() if r.verb == "patch"]
        assert patches and patches[-1] == (200, CONTROLLER_USER), patches
        assert "Traceback" not in controller.logs()
