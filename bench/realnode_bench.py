"""Real-node benchmark: sandbox recreations on a real kubelet (containerd, runc, CNI bridge) with the chart's
controller from the project's image, timed from the kubelet's status update with the new IP to Istio's
rules in the new sandbox.

Each round kills the pause process of every pod, one pod at a time; the kubelet makes a new sandbox and
posts its IP. "Status update" is the arrival of that update at a watch in this process (established before
the kill); "rules in place" is the first poll (every 10 ms; the section reports what one poll costs, which
bounds the resolution) that finds Istio's rules in the new sandbox's namespace. The controller runs without
its periodic repair pass, so every capture comes from the update. The first round is each pod's first
recreation; the next kill follows as soon as the update and the rules were both seen (the kubelet's restart
back-off of the pod's containers does not slow the bench). Needs root and IPNC_REALNODE_BIN or
IPNC_REALNODE_ARCHIVE; without them it prints a section saying so. `--into docs/benchmarks.md` replaces its
own section in place.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
import tomllib
from pathlib import Path

from samples import pct, provenance, save

from ipnc_lab.realnode import binaries
from ipnc_lab.realnode import workloads as wl
from ipnc_lab.realnode.recreate import Recreation, recreate_sandboxes
from ipnc_lab.realnode.session import NO_REPAIR_PASS, image_archive, node_with_controller
from ipnc_lab.sim.cluster import unique_name

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Real node"
PODS = 8
ROUNDS = 4
BUDGET = 1.0
"""seconds: every sandbox change must be captured within this of the kubelet's status update"""


def measure() -> list[list[Recreation]]:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    with node_with_controller(image_archive(ROOT, version), NO_REPAIR_PASS) as node:
        namespace = unique_name("bench")
        wl.ensure_namespace(node.api, namespace, node.pki.ca.read_text())
        names = [f"web-{i}" for i in range(PODS)]
        for name in names:
            wl.create_pod(node.api, wl.mesh_pod(name, namespace, node.name))
        wl.wait_captured(node.api, namespace, names, timeout=180)
        rounds = []
        for _ in range(ROUNDS):
            runs = []
            for name in names:  # one at a time: the poll watches one namespace, every 10 ms
                pod = node.api.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
                runs += recreate_sandboxes(node.api, namespace, [pod], timeout=60)
            rounds.append(runs)
        return rounds


def row(label: str, runs: list[Recreation]) -> str:
    latencies = [r.latency * 1000 for r in runs if r.latency is not None]
    missed = len(runs) - len(latencies)
    over = sum(1 for ms in latencies if ms > BUDGET * 1000)
    if not latencies:
        return f"| {label} | 0 | — | — | — | {missed} | {over} |"
    p50, p99 = statistics.median(latencies), pct(latencies, 0.99)
    return (f"| {label} | {len(latencies)} | {p50:.0f} ms | {p99:.0f} ms "
            f"| {max(latencies):.0f} ms | {missed} | {over} |")  # fmt: skip


def section() -> str:
    if not binaries.requested():
        return (f"{HEADING}\n\nNot measured in this run: set {binaries.BIN_VARIABLE} or "
                f"{binaries.ARCHIVE_VARIABLE} (docs/realnode.md).\n")  # fmt: skip
    started = time.monotonic()
    rounds = measure()
    first, later = rounds[0], [r for runs in rounds[1:] for r in runs]
    everything = [*first, *later]
    save("realnode", {"latency_s": [[r.latency for r in runs] for runs in rounds]})
    misses = [r for r in everything if r.latency is None or r.latency > BUDGET]
    poll_ms = statistics.median(r.polling / r.polls * 1000 for r in everything if r.polls)
    lines = [
        HEADING,
        "",
        provenance("realnode_bench.py"),
        "",
        f"A real kubelet 1.36 with containerd and runc, the chart's controller from the project's image (no "
        f"repair pass). {PODS} mesh pods; {ROUNDS} rounds, each killing every pod's pause process: the "
        "kubelet makes a new sandbox and posts its IP. Latency: from that status update reaching a watch to "
        "Istio's rules seen in the new sandbox (polled every 10 ms; one poll took "
        f"{poll_ms:.0f} ms median, which bounds the resolution). One pod at a time.",
        "",
        "| recreation | samples | p50 | p99 | max | no rules within 60 s | over 1 s |",
        "|---|---|---|---|---|---|---|",
        row("first (round 1)", first),
        row(f"later (rounds 2–{ROUNDS})", later),
        row("all", everything),
        "",
    ]
    if misses:
        lines.append(f"**Missed the goal** (every sandbox change captured within {BUDGET:g} s of the "
                     f"kubelet's status update): {len(misses)} of {len(everything)} "
                     "recreations.\n")  # fmt: skip
    else:
        lines.append(f"Every one of the {len(everything)} recreations was captured within {BUDGET:g} s of "
                     "the kubelet's status update.\n")  # fmt: skip
    lines.append(f"Whole run (node up, image imported, {ROUNDS} rounds, node removed): "
                 f"{time.monotonic() - started:.0f} s.\n")  # fmt: skip
    return "\n".join(lines)


def splice(document: str, text: str) -> str:
    """`document` with its real-node section replaced by `text` (inserted before the plots if absent)."""
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _: text.rstrip() + "\n\n", document, count=1)
    if "\n## Plots" in document:
        head, _, tail = document.partition("\n## Plots")
        return f"{head}\n{text.rstrip()}\n\n## Plots{tail}"
    return document.rstrip() + "\n\n" + text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--into", type=Path, help="replace this section in the given Markdown file")
    args = parser.parse_args()
    text = section()
    if args.into:
        args.into.write_text(splice(args.into.read_text(), text))
    else:
        print(text)


if __name__ == "__main__":
    main()
