"""Controller benchmark: a burst of 200 mesh pods on one node, RSS with 1000 pods, and a concurrency sweep.

Pods are real (a netns, a veth, a `sleep` in a kubelet-named cgroup; `ipnc_lab.sim`),
the API is the emulator, the controller a real subprocess with the chart's RBAC. "Visible" is the moment
the pod is stored in the emulator; "marked" is when the controller's patch reached the emulator (its
request log). Prints a Markdown section `## Controller` and saves the raw samples as `controller`.
Needs root.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass

from samples import pct, save, target

from ipnc_lab.localapi import PODS
from ipnc_lab.sim.cluster import CONTROLLER_USER, SimCluster, pod_manifest
from ipnc_lab.sim.controller import ControllerProcess, wait_for
from ipnc_lab.sim.node import SimNode
from istio_pod_network_controller.controller.config import default_concurrency

BURST = 200
TOTAL = 1000
SWEEP_PODS = 100
SWEEP = (1, 2, 4, 8)


@dataclass
class Burst:
    controller: ControllerProcess
    latencies_ms: list[float]
    seconds: float
    calls: Counter[str]
    setup_s: float


def burst(cluster: SimCluster, node: SimNode, prefix: str, count: int, extra: list[str]) -> Burst:
    """Namespaces first (not timed), then a ready controller, then `count` pod objects at once."""
    setup = time.monotonic()
    sims = [node.add_pod(f"{prefix}-{i}", "default") for i in range(count)]
    setup = time.monotonic() - setup
    ctl = cluster.start_controller(node, extra)
    ctl.wait_ready(30)
    cluster.api.requests.clear()
    created: dict[str, float] = {}
    started = time.time()
    for sim in sims:
        cluster.create_pod(node, sim, sim.name)
        created[sim.name] = time.time()
    cluster.wait_initialized(sims, 120, ctl.log)
    time.sleep(0.5)  # let the last Events land before counting
    records = [r for r in cluster.api.requests.records() if r.user == CONTROLLER_USER]
    marked = {r.name: r.time + (r.duration or 0) for r in records if r.verb == "patch" and r.status == 200}
    latencies = [(marked[s.name] - created[s.name]) * 1000 for s in sims]
    calls = Counter(f"{r.verb} {r.resource}" for r in records if r.verb not in ("watch", "list"))
    return Burst(ctl, latencies, max(marked.values()) - started, calls, setup)


def main() -> None:
    with SimCluster(history_size=5000) as cluster:
        node = cluster.add_node("ipncb")
        main_burst = burst(cluster, node, "burst", BURST, ["--log-level", "warning"])
        ctl = main_burst.controller
        rss_burst = ctl.rss_mib()

        idle = [pod_manifest(f"idle-{i}", "default", node.name, mesh=False) for i in range(TOTAL - BURST)]
        cluster.store.seed(PODS, idle)
        wait_for(lambda: ctl.metric("istio_pod_network_controller_pods_cached") == TOTAL, 60, "1000 cached")
        wait_for(lambda: ctl.metric("istio_pod_network_controller_queue_depth") == 0, 60, "queue drained")
        time.sleep(1.0)
        rss_full = ctl.rss_mib()
        assert ctl.terminate() == 0
        for sim in list(node.pods):
            cluster.delete_pod(node, sim)
        for body in idle:
            cluster.store.delete(PODS, "default", body["metadata"]["name"])

        sweep = []
        for concurrency in SWEEP:
            extra = ["--log-level", "warning", "--concurrency", str(concurrency)]
            run = burst(cluster, node, f"c{concurrency}", SWEEP_PODS, extra)
            assert run.controller.terminate() == 0
            sweep.append({"concurrency": concurrency, "pods_per_s": SWEEP_PODS / run.seconds})
            for sim in list(node.pods):
                cluster.delete_pod(node, sim)

    latencies, elapsed, calls = main_burst.latencies_ms, main_burst.seconds, main_burst.calls
    save("controller", {"latency_ms": latencies, "concurrency_sweep": sweep})
    print("## Controller\n")
    print(f"{BURST} mesh pods created in the emulator in one burst on one node (netns, veth, `sleep` made "
          f"beforehand, {main_burst.setup_s:.1f} s of set-up not counted, then moved into the kubelet-named "
          "cgroup of the UID the API assigned); controller as a subprocess with default flags "
          f"(--concurrency {default_concurrency()} here), RBAC-restricted user.\n")  # fmt: skip
    one = f"1 burst of {BURST} pods"
    print("| measure | value | samples |\n|---|---|---|")
    print(f"| pod visible → marked, p50 | {statistics.median(latencies):.0f} ms | {BURST} pods |")
    print(f"| pod visible → marked, p99 | {pct(latencies, 0.99):.0f} ms | {BURST} pods |")
    print(f"| pod visible → marked, max | {max(latencies):.0f} ms | {BURST} pods |")
    print(f"| throughput | {BURST / elapsed:.0f} pods/s ({BURST} pods in {elapsed:.2f} s) | {one} |")
    per_pod = ", ".join(f"{n / BURST:.2f} {k}" for k, n in sorted(calls.items()))
    print(f"| API requests per pod (burst) | {sum(calls.values()) / BURST:.2f} ({per_pod}) | {one} |")
    print(f"| controller RSS after the burst ({BURST} pods) | {rss_burst:.1f} MiB | 1 reading |")
    print(f"| controller RSS with {TOTAL} pods on the node | {rss_full:.1f} MiB | 1 reading |")
    print(f"\nThe {TOTAL}-pod RSS adds {TOTAL - BURST} non-mesh pods (no netns, never selected) to the "
          f"{BURST} initialized mesh pods; VmRSS from /proc/<pid>/status.\n")  # fmt: skip
    print(target("throughput", f"{BURST / elapsed:.0f} pods/s", "≥ 100 pods/s", BURST / elapsed >= 100, one))
    rss = max(rss_burst, rss_full)
    print(target("controller RSS", f"{rss:.1f} MiB", "≤ 80 MiB", rss <= 80, "2 readings") + "\n")
    print(f"Throughput against `--concurrency` (a fresh controller and 1 burst of {SWEEP_PODS} pods each):\n")
    print("| --concurrency | pods/s | samples |\n|---|---|---|")
    for row in sweep:
        print(f"| {row['concurrency']} | {row['pods_per_s']:.0f} | 1 burst of {SWEEP_PODS} pods |")


if __name__ == "__main__":
    main()
