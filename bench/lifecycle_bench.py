"""Pod lifecycle benchmark: a recreated sandbox → captured, and a node reboot → every pod re-captured.

Pods are real (`ipnc_lab.sim`); the kubelet's part is played by `SimCluster.recreate_sandbox` (a new
netns with a new IP and new processes, then status updates in the given order; "ip-only" posts the new
IP with the old containers still listed and nothing more: only the IP tells the sandbox changed, as in
issue 19) and `SimCluster.reboot`. The controller runs with `--repair-interval 0`, so every capture
measured here comes from the pod update, never from the periodic verify. "Captured" is the first
moment the new namespace holds exactly the pod's rules (`dataplane.verify`, polled every 10 ms; one poll
costs a few ms, which bounds the resolution). Prints a Markdown section `## Pod lifecycle` and saves the
raw samples as `lifecycle`. Needs root.
"""

from __future__ import annotations

import statistics
import time

from samples import pct, save

from ipnc_lab.sim.cluster import SimCluster
from ipnc_lab.sim.controller import wait_for

PODS = 10
ROUNDS = 3
REBOOT_PODS = 30
ORDERS = ("ip-first", "containers-first", "ip-only")


def recreation_latencies(order: str) -> dict[str, list[float]]:
    """Milliseconds to the new sandbox holding the rules: from the recreation's start (old processes
    stopped, new netns plumbed, both updates written) and from the last status update."""
    samples: dict[str, list[float]] = {"recreation": [], "update": []}
    with SimCluster() as cluster:
        node = cluster.add_node("ipncy")
        pods = [cluster.add_pod(node, f"web-{i}") for i in range(PODS)]
        ctl = cluster.start_controller(node, ["--repair-interval", "0", "--log-level", "warning"])
        ctl.wait_ready(30)
        cluster.wait_initialized(pods, 60, ctl.log)
        for _ in range(ROUNDS):
            for pod in pods:
                begun = time.monotonic()
                cluster.recreate_sandbox(node, pod, order)
                announced = time.monotonic()  # the last status update (with the new IP) is written
                wait_for(lambda pod=pod: cluster.verify(pod).in_place, 30, "captured", interval=0.01)
                samples["recreation"].append((time.monotonic() - begun) * 1000)
                samples["update"].append((time.monotonic() - announced) * 1000)
        reinitialized = ctl.metric("istio_pod_network_controller_pods_reinitialized_total")
        assert reinitialized == PODS * ROUNDS, reinitialized
        assert ctl.terminate() == 0
    return samples


def reboot_recapture() -> tuple[float, float]:
    """Seconds from the controller's start (after a reboot while it was down) to every pod captured."""
    with SimCluster() as cluster:
        node = cluster.add_node("ipncr")
        pods = [cluster.add_pod(node, f"mesh-{i}") for i in range(REBOOT_PODS)]
        ctl = cluster.start_controller(node, ["--repair-interval", "0", "--log-level", "warning"])
        ctl.wait_ready(30)
        cluster.wait_initialized(pods, 60, ctl.log)
        assert ctl.terminate() == 0
        cluster.reboot(node)
        started = time.monotonic()
        again = cluster.start_controller(node, ["--repair-interval", "0", "--log-level", "warning"])
        again.wait_ready(60)
        ready = time.monotonic() - started
        wait_for(lambda: all(cluster.verify(p).in_place for p in pods), 60, "all re-captured", interval=0.01)
        captured = time.monotonic() - started
        patches = cluster.api.requests.count(verb="patch", resource="pods", status=200)
        assert patches == REBOOT_PODS, patches  # each pod marked once, before the reboot
        assert again.terminate() == 0
    return ready, captured


def main() -> None:
    latencies = {order: recreation_latencies(order) for order in ORDERS}
    ready, captured = reboot_recapture()
    save("lifecycle", {"recreation_ms": latencies, "reboot_ready_s": ready, "reboot_captured_s": captured})
    print("## Pod lifecycle\n")
    print(f"A pod's sandbox recreated as the kubelet does after SandboxChanged (new netns, new IP, new "
          f"processes, then the status updates), {ROUNDS} rounds over {PODS} initialized pods per order; "
          "controller with `--repair-interval 0`, so the capture comes from the update.\n")  # fmt: skip
    print("| status updates | from | samples | p50 | p95 | max |\n|---|---|---|---|---|---|")
    for order, series in latencies.items():
        for start, values in series.items():
            print(f"| {order} | {start} | {len(values)} | {statistics.median(values):.0f} ms "
                  f"| {pct(values, 0.95):.0f} ms | {max(values):.0f} ms |")  # fmt: skip
    print(
        "\n`recreation`: from stopping the old sandbox's processes (includes making the new netns and "
        "veth, ~20 ms, and writing both updates); `update`: from the last status update written."
    )
    print(f"\nNode reboot with the controller down ({REBOOT_PODS} mesh pods, every sandbox new): controller "
          f"start → ready {ready:.2f} s, → every pod seen re-captured {captured:.2f} s (the check itself "
          "polls all pods one after the other); no pod marked twice.\n")  # fmt: skip


if __name__ == "__main__":
    main()
