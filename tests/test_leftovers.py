"""The session-end leftover check (tests/conftest.py) sees what a test made and did not remove."""

from __future__ import annotations

import subprocess

import pytest

from ipnc_lab.sim import leftovers
from ipnc_lab.sim.cluster import unique_name
from ipnc_lab.sim.controller import wait_for
from ipnc_lab.sim.node import SimNode, cgroup2_mount


@pytest.mark.root
def test_a_netns_cgroup_and_process_left_behind_are_reported_then_gone() -> None:
    name, other = unique_name("ipnc-left"), unique_name("ipnc-left")
    group = cgroup2_mount() / f"ipnc-{name}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    group.mkdir()
    child = subprocess.Popen(["sleep", "infinity"])
    try:
        (group / "cgroup.procs").write_text(str(child.pid))
        lines = leftovers.report([name, other])
        assert f"network namespace {name}" in lines
        assert f"cgroup {group} (processes: [{child.pid}])" in lines
        assert f"process {child.pid} sleep infinity" in lines
        assert not [line for line in lines if other in line]  # only what exists is reported
    finally:
        child.kill()
        child.wait(10)
        group.rmdir()
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert leftovers.report([name]) == []


@pytest.mark.root
def test_a_sim_node_kills_what_its_pods_left_running() -> None:
    """A pod process's own child (a shell's `sleep`, a tenant's fork) dies with the pod's cgroup."""
    with SimNode(unique_name("ipncl")) as node:
        pod = node.add_pod("forker", "ns", "0e0e0e0e-0000-4000-8000-00000000000f")
        shell = node.spawn(pod, ["sh", "-c", "sleep 1000 & wait"], uid=1000, gid=1000)
        group = pod.cgroup

        def pids() -> list[str]:
            return (group / "cgroup.procs").read_text().split()

        wait_for(lambda: len(pids()) == 3, 10, "sandbox, shell and the shell's own sleep in the cgroup")
        assert str(shell.pid) in pids()
        node.remove_pod(pod)
        assert not group.exists()
    assert leftovers.report([node.name]) == []
