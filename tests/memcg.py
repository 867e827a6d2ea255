"""A memory cgroup of a test's own (cgroup v1 `memory`, or v2 with the memory controller) with a limit:
run a command in it, read its peak and whether the kernel OOM-killed anything in it. Removed afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from ipnc_lab.sim.cluster import unique_name

V1 = Path("/sys/fs/cgroup/memory")


def _v2_root() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            root = Path(fields[1])
            if "memory" in (root / "cgroup.controllers").read_text().split():
                return root
    raise RuntimeError("no memory cgroup controller is available")


class MemoryCgroup:
    def __init__(self, limit: int) -> None:
        self.v1 = (V1 / "memory.limit_in_bytes").exists()
        parent = V1 if self.v1 else _v2_root()
        self.path = parent / unique_name("ipnc-mem")
        self.path.mkdir()
        self._write("memory.limit_in_bytes" if self.v1 else "memory.max", str(limit))
        if self.v1:
            with contextlib.suppress(OSError):  # no swap accounting: the limit alone binds
                self._write("memory.memsw.limit_in_bytes", str(limit))
        else:
            self._write("memory.swap.max", "0")

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def spawn(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        """`argv` started inside the cgroup (it joins before exec, so all it allocates is counted)."""
        procs = self.path / "cgroup.procs"
        return subprocess.Popen(["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *argv], **popen)

    def peak(self) -> int:
        """Bytes: the highest usage seen (memory.max_usage_in_bytes / memory.peak; includes page cache)."""
        return int(self._read("memory.max_usage_in_bytes" if self.v1 else "memory.peak"))

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.v1 else "memory.events"
        for line in self._read(name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def pids(self) -> list[int]:
        return [int(p) for p in self._read("cgroup.procs").split()]

    def remove(self) -> None:
        """Kill what is left inside (by PID) and remove the cgroup."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.path.rmdir()


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[MemoryCgroup]:
    group = MemoryCgroup(limit)
    try:
        yield group
    finally:
        group.remove()


def vm_hwm(pid: int) -> int:
    """Bytes: the process's peak resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def read_lines_until(stream: IO[bytes], marker: bytes, limit: int = 200) -> list[bytes]:
    """Lines of `stream` up to and including the first holding `marker` (a process's startup log)."""
    lines = []
    for _ in range(limit):
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise RuntimeError(f"{marker!r} never appeared: {b''.join(lines)!r}")
