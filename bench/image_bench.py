"""Image benchmark (root, after `make image`): prints the `## Image` section of docs/benchmarks.md on stdout.

(1) The image's size and its layers (podman history), and the biggest packages of the product's venv.
(2) The waiter's start-up inside the image, run as the injection code runs it (uid 1337, no capabilities,
    read-only root, a fresh network namespace without rules): from just before `podman run` to the
    interpreter's exec, and from the exec to the waiter's first probe attempt (CLOCK_MONOTONIC is shared
    with the container, which has no time namespace).

Usage: .venv/bin/python bench/image_bench.py [runs]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from samples import provenance, timing_table

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "tools" / "containers.conf")}
ENTRYPOINT = "/opt/ipnc/bin/istio-pod-network-controller"
EXEC = re.compile(r"exec at monotonic=([0-9.]+)")
FIRST = re.compile(r"first probe attempt at monotonic=([0-9.]+)")
WRAPPER = (
    "import os, sys, time; print(f'exec at monotonic={time.monotonic():.6f}', file=sys.stderr, flush=True); "
    f"os.execv({ENTRYPOINT!r}, [{ENTRYPOINT!r}, 'wait', '--file', '/nonexistent', '--timeout', '0.5', "
    "'--verbose'])"
)


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def chart_image() -> str:
    chart = yaml.safe_load((ROOT / "chart" / "istio-pod-network-controller" / "values.yaml").read_text())
    version = yaml.safe_load((ROOT / "chart" / "istio-pod-network-controller" / "Chart.yaml").read_text())
    return f"{chart['image']['repository']}:{chart['image']['tag'] or version['appVersion']}"


def one_start(image: str, index: int) -> tuple[float, float]:
    """(seconds from `podman run` to the interpreter's exec, seconds from exec to the first probe)."""
    ns = f"ipncib{os.getpid() % 100000}x{index}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        started = time.monotonic()
        done = podman(
            "run", "--rm", "--network", f"ns:/run/netns/{ns}", "--user", "1337:1337", "--cap-drop", "ALL",
            "--read-only", "--read-only-tmpfs=false", "--security-opt", "no-new-privileges",
            "--entrypoint", "/opt/ipnc/bin/python", image, "-c", WRAPPER,
        )  # fmt: skip
        exec_at, first = EXEC.search(done.stderr), FIRST.search(done.stderr)
        if exec_at is None or first is None:
            raise RuntimeError(f"no timestamps (exit {done.returncode}):\n{done.stderr}")
        return float(exec_at.group(1)) - started, float(first.group(1)) - float(exec_at.group(1))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def mib(size: float) -> str:
    return f"{size / 2**20:.1f}"


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    if os.geteuid() != 0:
        raise SystemExit("image_bench needs root (podman, network namespaces)")
    image = chart_image()
    inspected = podman("image", "inspect", image)
    if inspected.returncode != 0:
        raise SystemExit(f"{image} is not built: run `make image`")
    size = json.loads(inspected.stdout)[0]["Size"]
    layers = [h for h in json.loads(podman("history", "--format", "json", image).stdout) if h["size"]]
    packages = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", image, "-c",
        "du -s -k /opt/ipnc/lib/python3.11/site-packages/*",
    )  # fmt: skip
    biggest = [line.split(None, 1) for line in packages.stdout.splitlines() if "dist-info" not in line]
    one_start(image, -1)  # warm the page cache; not counted
    results = [one_start(image, i) for i in range(runs)]
    to_exec = [r[0] for r in results]
    to_probe = [r[1] for r in results]
    print("## Image")
    print()
    print(
        f"{provenance('image_bench.py')} `{image}` as "
        f"`make image` builds it (podman, local debootstrap base): **{mib(size)} MiB** uncompressed."
    )
    print()
    print("| layer (Dockerfile step) | MiB |")
    print("|---|---|")
    for number, layer in enumerate(reversed(layers)):
        step = re.sub(r"^(\|\d+ \S+ )?/bin/sh -c (#\(nop\) )?", "", layer["CreatedBy"])
        step = "FROM ${BASE_IMAGE} (the base's own layer)" if number == 0 else step
        print(f"| `{step[:70].replace('|', '/')}` | {mib(layer['size'])} |")
    print()
    print("Biggest packages in the venv (KiB): " + ", ".join(
        f"{Path(path).name} {kib}" for kib, path in sorted(biggest, key=lambda b: -int(b[0]))[:8]
    ))  # fmt: skip
    print()
    print(
        "Waiter start-up inside the image (uid 1337, no capabilities, read-only root, fresh netns, "
        "`podman run` with runc):"
    )
    print()
    print(
        timing_table(
            {
                "`podman run` → interpreter exec in the container": to_exec,
                "exec → waiter's first probe attempt": to_probe,
            }
        )
    )
    print()
    print(
        "The first figure is the container engine's (podman + conmon + runc; a kubelet with containerd "
        "differs); the second is the image's own share: interpreter start, imports and the spec."
    )


if __name__ == "__main__":
    main()
