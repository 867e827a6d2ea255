"""The CPUs this process may really use: its cgroup's CPU quota (a container's CPU limit), else the cores.

`os.cpu_count()` is the node's: a container limited to half a core on a 64-core node would size its worker
pool for 64. The quota is read as the kernel enforces it: the smallest one on the way from our cgroup to the
root of its hierarchy (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import PurePosixPath

Reader = Callable[[str], str | None]


def read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def quota_v2(text: str | None) -> float | None:
    """`cpu.max` ("max 100000" or "50000 100000") in CPUs; None when unlimited or unreadable."""
    parts = (text or "").split()
    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit() or int(parts[1]) == 0:
        return None
    return int(parts[0]) / int(parts[1])


def quota_v1(quota: str | None, period: str | None) -> float | None:
    """`cpu.cfs_quota_us` / `cpu.cfs_period_us` in CPUs; a quota of -1 means unlimited."""
    try:
        q, p = int((quota or "").strip()), int((period or "").strip())
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _mounts(mountinfo: str) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(root, mount point) of the cgroup v2 hierarchy and of the v1 hierarchy holding the cpu controller."""
    v2 = v1 = None
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2" and v2 is None:
            v2 = (fields[3], fields[4])
        elif tail[0] == "cgroup" and "cpu" in tail[2].split(",") and v1 is None:
            v1 = (fields[3], fields[4])
    return v2, v1


def _levels(mount: tuple[str, str], path: str) -> list[str]:
    """Our cgroup's directory and each parent up to the mount point."""
    root, point = mount
    inside = PurePosixPath("/", path).relative_to(root) if path.startswith(root) else PurePosixPath(".")
    here = PurePosixPath(point, inside)
    levels = [str(here)]
    while here != PurePosixPath(point):
        here = here.parent
        levels.append(str(here))
    return levels


def cgroup_cpu_limit(read: Reader = read_text) -> float | None:
    """The smallest CPU quota above this process, in CPUs; None when no cgroup limits it."""
    v2, v1 = _mounts(read("/proc/self/mountinfo") or "")
    limits: list[float] = []
    for line in (read("/proc/self/cgroup") or "").splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "" and v2 is not None:
            limits += [q for d in _levels(v2, path) if (q := quota_v2(read(f"{d}/cpu.max"))) is not None]
        elif "cpu" in controllers.split(",") and v1 is not None:
            for d in _levels(v1, path):
                q = quota_v1(read(f"{d}/cpu.cfs_quota_us"), read(f"{d}/cpu.cfs_period_us"))
                limits += [q] if q is not None else []
    return min(limits) if limits else None


def usable_cpus(read: Reader = read_text) -> int:
    """Whole CPUs this process may use: the quota rounded up, never more than the cores it may run on."""
    cores = len(os.sched_getaffinity(0)) or os.cpu_count() or 1
    limit = cgroup_cpu_limit(read)
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))
