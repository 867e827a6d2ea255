"""The default worker count follows the container's CPU limit (its cgroup quota), not the node's cores."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipnc_lab.sim.cluster import unique_name
from istio_pod_network_controller.controller import config as cfg
from istio_pod_network_controller.controller.cpus import cgroup_cpu_limit, quota_v1, quota_v2

V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
V1_MOUNTINFO = (
    "35 25 0:30 /kubepods/pod1 /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
    "36 25 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
)


def test_quota_files() -> None:
    assert quota_v2("50000 100000\n") == 0.5
    assert quota_v2("max 100000\n") is None and quota_v2(None) is None and quota_v2("1 0") is None
    assert quota_v1("150000\n", "100000\n") == 1.5
    assert quota_v1("-1\n", "100000\n") is None and quota_v1("x", "1") is None


def test_v2_takes_the_smallest_quota_on_the_way_to_the_root() -> None:
    files = {
        "/proc/self/mountinfo": V2_MOUNTINFO,
        "/proc/self/cgroup": "0::/kubepods/burstable/pod1/ctr\n",
        "/sys/fs/cgroup/kubepods/burstable/pod1/ctr/cpu.max": "50000 100000\n",
        "/sys/fs/cgroup/kubepods/burstable/cpu.max": "max 100000\n",
        "/sys/fs/cgroup/kubepods/cpu.max": "400000 100000\n",
    }
    assert cgroup_cpu_limit(files.get) == 0.5
    files["/sys/fs/cgroup/kubepods/cpu.max"] = "20000 100000\n"
    assert cgroup_cpu_limit(files.get) == 0.2


def test_v1_inside_a_container_whose_mount_root_is_its_cgroup() -> None:
    files = {
        "/proc/self/mountinfo": V1_MOUNTINFO,
        "/proc/self/cgroup": "4:memory:/kubepods/pod1\n3:cpu,cpuacct:/kubepods/pod1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "250000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    assert cgroup_cpu_limit(files.get) == 2.5
    assert cgroup_cpu_limit({"/proc/self/cgroup": "0::/\n"}.get) is None  # nothing mounted: no limit


def test_default_concurrency_is_twice_the_usable_cpus_between_2_and_the_cap() -> None:
    assert [cfg.default_concurrency(n) for n in (1, 2, 3, 64)] == [2, 4, 4, 4]
    assert cfg.MAX_DEFAULT_CONCURRENCY == 4


@pytest.fixture
def cpu_cgroup() -> Iterator[Path]:
    """A cgroup v1 `cpu` (or v2) group of our own with half a CPU, removed afterwards."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        group = v1 / unique_name("ipnc-cpu")
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("50000")
    else:
        unified = next(p for p in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")) if p.is_dir())
        if "cpu" not in (unified / "cgroup.subtree_control").read_text().split():
            pytest.skip("the cpu controller is not enabled for child cgroups here")
        group = unified / unique_name("ipnc-cpu")
        group.mkdir()
        (group / "cpu.max").write_text("50000 100000")
    try:
        yield group
    finally:
        group.rmdir()


@pytest.mark.root
def test_a_process_limited_to_half_a_cpu_gets_two_workers(cpu_cgroup: Path) -> None:
    code = (
        "import sys; sys.stdin.readline(); "
        "from istio_pod_network_controller.controller import config, cpus; "
        "print(cpus.cgroup_cpu_limit(), config.default_concurrency())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        (cpu_cgroup / "cgroup.procs").write_text(str(proc.pid))
        out, _ = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert out.split() == ["0.5", "2"]
