"""Waiter benchmark (root): prints the `## Waiter` section of docs/benchmarks.md on stdout.

(1) From the moment `dataplane.apply` returns to the waiter's exit, waiter started first and the rules
    applied ~200 ms later, each run in a fresh netns.
(2) From just before Popen to the waiter's first probe attempt (the timestamp it logs with --verbose).
The waiter runs as it would in a pod: uid/gid 1337, empty capability set, through `ip netns exec` and
`setpriv`, on Debian's /usr/bin/python3 with a byte-compiled copy of the package and click.

Usage: .venv/bin/python bench/waiter_bench.py [runs]
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from samples import provenance, save, target, timing_table

import istio_pod_network_controller
from istio_pod_network_controller.dataplane.apply import apply
from istio_pod_network_controller.dataplane.netns import PinnedNetns
from istio_pod_network_controller.settings.spec import build_spec

SYSTEM_PYTHON = "/usr/bin/python3"
APPLY_AFTER = 0.200
FIRST = re.compile(r"first probe attempt at monotonic=([0-9.]+)")


def build_runtime() -> Path:
    base = Path(tempfile.mkdtemp(prefix="ipnc-waiter-bench-"))
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(istio_pod_network_controller.__file__).parent, base / "istio_pod_network_controller",
                    ignore=skip)  # fmt: skip
    shutil.copytree(Path(click.__file__).parent, base / "click", ignore=skip)
    subprocess.run([SYSTEM_PYTHON, "-m", "compileall", "-q", str(base)], check=True, capture_output=True)
    for root, dirs, files in os.walk(base):
        os.chmod(root, 0o755)  # noqa: S103 - the waiter's uid must read it
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
        del dirs
    return base


def one_run(runtime: Path, index: int) -> tuple[float, float]:
    """(seconds from apply returned to exit, seconds from Popen to first probe attempt)."""
    ns = f"ipncwb{os.getpid() % 100000}x{index}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        argv = [
            "ip", "netns", "exec", ns,
            "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs",
            SYSTEM_PYTHON, "-m", "istio_pod_network_controller", "wait",
            "--file", "/nonexistent/pod_annotations", "--timeout", "10", "--verbose",
        ]  # fmt: skip
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(runtime)}
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(max(0.0, started + APPLY_AFTER - time.monotonic()))
            with PinnedNetns.open_path(f"/run/netns/{ns}") as pinned:
                apply(pinned, build_spec({}), "legacy")
            applied = time.monotonic()
            proc.wait(timeout=15)
            exited = time.monotonic()
            assert proc.stderr is not None
            log = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"waiter exited {proc.returncode}:\n{log}")
        match = FIRST.search(log)
        if match is None:
            raise RuntimeError(f"no first-probe timestamp in:\n{log}")
        return exited - applied, float(match.group(1)) - started
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 25
    if os.geteuid() != 0:
        raise SystemExit("waiter_bench needs root (network namespaces, setpriv)")
    runtime = build_runtime()
    try:
        one_run(runtime, -1)  # warm the page cache; not counted
        results = [one_run(runtime, i) for i in range(runs)]
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    delays = [r[0] for r in results]
    starts = [r[1] for r in results]
    save(
        "waiter",
        {
            "rules applied → exit (ms)": [d * 1000 for d in delays],
            "start → first probe (ms)": [s * 1000 for s in starts],
        },
    )
    print("## Waiter")
    print()
    intro = (
        f"{provenance('waiter_bench.py')} Each run: "
        f"fresh netns; waiter ({SYSTEM_PYTHON}, uid/gid 1337, no capabilities, via `ip netns exec` + "
        f"`setpriv`) started first; default REDIRECT rules applied (legacy backend) {APPLY_AFTER * 1000:.0f} "
        "ms after Popen."
    )
    print(intro)
    print()
    print(
        timing_table(
            {"rules applied (apply returned) → waiter exited": delays, "Popen → first probe attempt": starts}
        )
    )
    print()
    runs = f"{len(results)} runs"
    exit_ms, start_ms = statistics.median(delays) * 1000, statistics.median(starts) * 1000
    print(target("rules → exit, median", f"{exit_ms:.1f} ms", "≤ 100 ms", exit_ms <= 100, runs))
    print(target("start → first probe, median", f"{start_ms:.1f} ms", "≤ 150 ms", start_ms <= 150, runs))
    print()
    print(
        "The start figure includes `ip netns exec` and `setpriv`; the exit figure includes the rest of the "
        "current backoff wait (max(10 ms, waited/8) by then) and interpreter shutdown."
    )


if __name__ == "__main__":
    main()
