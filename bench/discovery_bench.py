"""Pod netns discovery cost with >= 500 processes on the node: one full /proc scan, and one find() on it.

Starts 520 `sleep` processes (10 fake pods of 20 processes, each pod in its own netns and kubelet-style
cgroup, plus 320 plain ones), measures, and removes every process, netns and cgroup dir it created.
Needs root. Prints a Markdown section to stdout.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from istio_pod_network_controller.dataplane.discovery import ProcIndex, find_pod_netns

UNIFIED = "/sys/fs/cgroup/unified"
PODS = 10
PER_POD = 20
PLAIN = 320
RUNS = 25


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _timed(fn: Callable[[], object]) -> list[float]:
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _row(name: str, samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return f"| {name} | {len(ms)} | {statistics.median(ms):.2f} | {min(ms):.2f} | {max(ms):.2f} |"


def _wait_in_netns(pid: int, ns_path: str) -> None:
    want = os.stat(ns_path).st_ino
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{pid}/ns/net").st_ino != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} never entered {ns_path}")
        time.sleep(0.001)


def main() -> None:
    prefix = f"ipnc-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[bytes]] = []
    namespaces: list[str] = []
    cgroups: list[str] = []
    pods: list[tuple[str, str]] = []  # (uid, pod IP)
    try:
        root = os.path.join(UNIFIED, prefix)
        os.mkdir(root)
        cgroups.append(root)
        for parent in ("kubepods", "kubepods/burstable"):
            cgroups.append(os.path.join(root, parent))
            os.mkdir(cgroups[-1])
        for p in range(PODS):
            uid, ns, ip = str(uuid.uuid4()), f"{prefix}-{p}", f"10.250.200.{p + 1}"
            _ip("netns", "add", ns)
            namespaces.append(ns)
            _ip("-n", ns, "addr", "add", f"{ip}/32", "dev", "lo")
            _ip("-n", ns, "link", "set", "lo", "up")
            pod_dir = os.path.join(root, "kubepods/burstable", f"pod{uid}")
            os.mkdir(pod_dir)
            cgroups.append(pod_dir)
            for _ in range(PER_POD):
                cid_dir = os.path.join(pod_dir, uuid.uuid4().hex * 2)
                os.mkdir(cid_dir)
                cgroups.append(cid_dir)
                proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"], stdin=subprocess.DEVNULL)
                procs.append(proc)
                _wait_in_netns(proc.pid, f"/run/netns/{ns}")
                Path(cid_dir, "cgroup.procs").write_text(str(proc.pid))
            pods.append((uid, ip))
        procs.extend(subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL) for _ in range(PLAIN))

        present = sum(1 for name in os.listdir("/proc") if name.isdigit())
        index = ProcIndex.scan()
        uid, ip = pods[PODS // 2]
        assert len(index.processes(uid)) == PER_POD

        def find_one() -> None:
            with index.find(uid, pod_ips=[ip]):
                pass

        def scan_and_find() -> None:
            with find_pod_netns(uid, pod_ips=[ip]):
                pass

        scan = _timed(ProcIndex.scan)
        find = _timed(find_one)
        both = _timed(scan_and_find)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        print("## Pod netns discovery\n")
        print(
            f"- date: {now}; nproc: {os.cpu_count()}; kernel: {platform.release()}; "
            f"Python {platform.python_version()}"
        )
        print(
            f"- processes under /proc: {present} ({len(procs)} started here: {PODS} pods x {PER_POD} "
            f"processes, each pod in its own netns and cgroupfs-style cgroup, plus {PLAIN} plain `sleep`s)"
        )
        print(f"- pod processes indexed by one scan: {sum(len(v) for v in index.pods.values())}\n")
        print("| operation | runs | median ms | min ms | max ms |")
        print("|---|---|---|---|---|")
        print(_row("`ProcIndex.scan()` (all of /proc)", scan))
        print(_row("`index.find(uid, pod_ips=[ip])` (one pod, 20 processes)", find))
        print(_row("`find_pod_netns(uid, pod_ips=[ip])` (scan + find)", both))
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=10)
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        for path in reversed(cgroups):
            os.rmdir(path)


if __name__ == "__main__":
    main()
