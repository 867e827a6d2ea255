"""What a test run left behind: named network namespaces, cgroups and processes it made and did not remove.

Names come from `unique_name` (cluster.py), so a run on a machine shared with other runs looks only at its
own; processes are this process's live children, and every process still inside one of its cgroups.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """Any issued name as a whole (ipnc12x1 must not match ipnc12x10)."""
    names = sorted(set(names), key=len, reverse=True)
    return re.compile("|".join(re.escape(n) + r"(?![0-9])" for n in names)) if names else None


def netns(names: Iterable[str]) -> list[str]:
    pattern = _pattern(names)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False, timeout=10)
    found = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    return [name for name in found if pattern is not None and pattern.search(name)]


def _hierarchies() -> list[Path]:
    """The cgroup v2 mount and every v1 hierarchy: where a test's cgroup may sit at the top level."""
    if (CGROUP_ROOT / "cgroup.procs").exists():
        return [CGROUP_ROOT]  # cgroup v2 only
    if not CGROUP_ROOT.is_dir():
        return []
    return [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and (p / "cgroup.procs").exists()]


def cgroups(names: Iterable[str]) -> dict[str, list[int]]:
    """Each leftover cgroup directory -> the processes still inside it (and its children)."""
    pattern = _pattern(names)
    found: dict[str, list[int]] = {}
    if pattern is None:
        return found
    for top in _hierarchies():
        for group in top.iterdir():
            if group.is_dir() and pattern.search(group.name):
                pids = [int(pid) for procs in group.rglob("cgroup.procs") for pid in _read(procs).split()]
                found[str(group)] = sorted(pids)
    return found


def children(parent: int) -> list[str]:
    """Live (not zombie) children of `parent`, as "PID command"."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat")
        _, _, rest = stat.rpartition(")")
        fields = rest.split()
        if len(fields) > 2 and fields[0] != "Z" and fields[1] == str(parent):
            command = _read(entry / "cmdline").replace("\0", " ").strip()
            found.append(f"{entry.name} {command[:120]}")
    return found


def report(names: Iterable[str], parent: int | None = None) -> list[str]:
    """One line per leftover; empty when the run cleaned up after itself."""
    names = tuple(names)
    lines = [f"network namespace {name}" for name in netns(names)]
    lines += [f"cgroup {group} (processes: {pids or 'none'})" for group, pids in cgroups(names).items()]
    lines += [f"process {child}" for child in children(parent if parent is not None else os.getpid())]
    return lines


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
