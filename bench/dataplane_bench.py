"""Per-pod apply cost of this project against a bare restore of the very same rendered rules.

Every sample uses a fresh network namespace. Three ways to load the default rule set (IPv4 capture plus the
IPv6 block table) are timed for each backend:
- `apply`: this project's `dataplane.apply.apply` (reads live state, one transaction per family, routes);
- `bare (setns)`: only the restore tool(s) fed the rendered text, from a thread inside the namespace — the
  floor any implementation pays;
- `bare (ip netns exec)`: the same through `ip netns exec`, as a script-based init step runs them.
Needs root. Prints a Markdown section to stdout.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

from samples import save

from istio_pod_network_controller.dataplane import apply as dataplane
from istio_pod_network_controller.dataplane import netns
from istio_pod_network_controller.dataplane.netns import PinnedNetns
from istio_pod_network_controller.rules import iptables, nftables, plan
from istio_pod_network_controller.settings.spec import build_spec

RUNS = 25
SPEC = build_spec({}).with_ipv6(False)
RULESET = plan.build(SPEC)


def _bare_inputs(backend: str) -> list[tuple[list[str], str]]:
    if backend == "nftables":
        return [(["nft", "-f", "-"], nftables.render(RULESET))]
    return [
        ([f"{'ip' if f.family == 4 else 'ip6'}tables-{backend}-restore", "--noflush"], iptables.render(f))
        for f in RULESET.families
    ]


def _load(commands: list[tuple[list[str], str]], prefix: list[str]) -> None:
    for argv, text in commands:
        subprocess.run([*prefix, *argv], input=text, text=True, check=True, capture_output=True)


def _sample(name: str, body: Callable[[str, PinnedNetns], None]) -> float:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with PinnedNetns.open_path(f"/run/netns/{name}") as handle:
            start = time.perf_counter()
            body(name, handle)
            return time.perf_counter() - start
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _series(backend: str) -> dict[str, list[float]]:
    commands = _bare_inputs(backend)
    ways: dict[str, Callable[[str, PinnedNetns], None]] = {
        "apply": lambda _, h: dataplane.apply(h, SPEC, backend),  # type: ignore[arg-type]
        "bare (setns)": lambda _, h: netns.run_in(h, lambda: _load(commands, [])),
        "bare (ip netns exec)": lambda n, _: _load(commands, ["ip", "netns", "exec", n]),
    }
    results: dict[str, list[float]] = {way: [] for way in ways}
    for run in range(RUNS):
        for way, body in ways.items():  # interleaved, so drift in machine load hits all ways alike
            results[way].append(_sample(f"ipnc-bench-{os.getpid()}-{run}", body))
    return results


def main() -> None:
    print("## Data plane: apply vs bare restore\n")
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"kernel {platform.release()}; default REDIRECT rule set (IPv4 capture + IPv6 block), "
        f"a fresh netns per sample, median of {RUNS} samples each.\n"
    )
    print("| backend | apply (ms) | bare restore, setns (ms) | bare restore, ip netns exec (ms) "
          "| apply / bare setns | apply / bare ip netns exec |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    raw: dict[str, list[float]] = {}
    for backend in ("legacy", "nft", "nftables"):
        measured = _series(backend)
        raw.update({f"{backend}: {way}": samples for way, samples in measured.items()})
        series = {way: statistics.median(v) * 1000 for way, v in measured.items()}
        apply_ms, setns_ms, exec_ms = series["apply"], series["bare (setns)"], series["bare (ip netns exec)"]
        print(
            f"| {backend} | {apply_ms:.1f} | {setns_ms:.1f} | {exec_ms:.1f} "
            f"| {apply_ms / setns_ms:.2f}x | {apply_ms / exec_ms:.2f}x |"
        )
    save("dataplane", raw)
    print(
        "\n`apply` also reads the live rules of every family (for idempotency), checks which rule systems "
        "hold tables, and syncs TPROXY policy routes over netlink; the bare loads do none of that.\n"
    )


if __name__ == "__main__":
    main()
