"""Controller benchmark: a burst of 200 mesh pods on one node, then RSS with 1000 pods on the node.

Pods are real (a netns, a veth, a `sleep` in a kubelet-named cgroup), the API is the emulator, the
controller a real subprocess with the DaemonSet's RBAC. "Visible" is the moment the pod is stored in the
emulator; "marked" is when the controller's patch reached the emulator (its request log).
Prints a Markdown section `## Controller`. Needs root.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "controller"))

from controller_nodesim import CONTROLLER_USER, SimPod, pod_manifest, simulated_node, wait_for

from istio_pod_network_controller.localapi import PODS

BURST = 200
TOTAL = 1000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    with simulated_node("ipncb", history_size=5000) as node:
        setup = time.monotonic()
        pods = [node.make_netns(f"burst-{i}") for i in range(BURST)]
        setup = time.monotonic() - setup
        ctl = node.start_controller("--log-level", "warning")
        ctl.wait_ready(30)
        node.api.requests.clear()
        created: dict[str, float] = {}
        started = time.time()
        for pod in pods:
            node.create(pod)
            created[pod.name] = time.time()
        wait_for(lambda: all(node.initialized(p) for p in pods), 120, "burst initialized")
        time.sleep(0.5)  # let the last Events land before counting
        records = [r for r in node.api.requests.records() if r.user == CONTROLLER_USER]
        marked = {
            r.name: r.time + (r.duration or 0) for r in records if r.verb == "patch" and r.status == 200
        }
        latencies = [(marked[p.name] - created[p.name]) * 1000 for p in pods]
        elapsed = max(marked.values()) - started
        calls = Counter(f"{r.verb} {r.resource}" for r in records if r.verb not in ("watch", "list"))
        rss_burst = rss_mib(ctl.proc.pid)

        extra = [SimPod(f"idle-{i}", None, None, None) for i in range(TOTAL - BURST)]
        node.api.store.seed(PODS, [pod_manifest(p.name, "default", node.name, mesh=False) for p in extra])
        wait_for(lambda: ctl.metric("istio_pod_network_controller_pods_cached") == TOTAL, 60, "1000 cached")
        wait_for(lambda: ctl.metric("istio_pod_network_controller_queue_depth") == 0, 60, "queue drained")
        time.sleep(1.0)
        rss_full = rss_mib(ctl.proc.pid)
        assert ctl.terminate() == 0

    print("## Controller\n")
    print(f"{BURST} mesh pods created in the emulator in one burst on one node (netns, veth, `sleep` in a "
          f"kubelet-named cgroup made beforehand, {setup:.1f} s of set-up not counted); controller as a "
          "subprocess with default flags (concurrency 2 x cores), RBAC-restricted user.\n")  # fmt: skip
    print("| measure | value |\n|---|---|")
    print(f"| pod visible → marked, p50 | {statistics.median(latencies):.0f} ms |")
    print(f"| pod visible → marked, p99 | {pct(latencies, 0.99):.0f} ms |")
    print(f"| pod visible → marked, max | {max(latencies):.0f} ms |")
    print(f"| throughput | {BURST / elapsed:.0f} pods/s ({BURST} pods in {elapsed:.2f} s) |")
    per_pod = ", ".join(f"{n / BURST:.2f} {k}" for k, n in sorted(calls.items()))
    print(f"| API requests per pod (burst) | {sum(calls.values()) / BURST:.2f} ({per_pod}) |")
    print(f"| controller RSS after the burst ({BURST} pods) | {rss_burst:.1f} MiB |")
    print(f"| controller RSS with {TOTAL} pods on the node | {rss_full:.1f} MiB |")
    print(f"\nThe {TOTAL}-pod RSS adds {TOTAL - BURST} non-mesh pods (no netns, never selected) to the "
          f"{BURST} initialized mesh pods; VmRSS from /proc/<pid>/status. Targets: >= 100 pods/s, "
          "RSS <= 80 MiB.")  # fmt: skip


if __name__ == "__main__":
    main()
