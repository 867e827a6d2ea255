"""Many nodes: three simulated nodes, one controller each (its own RBAC user with the chart's rules), one
emulator. Pods are added to one node at a time; the request log, split by user, shows each controller's
API load follows the pods on its own node, not the pods in the cluster. Prints `## Many nodes`; samples
saved as `many_nodes`. tests/soak/test_many_nodes.py asserts the behaviour. Needs root.
"""

from __future__ import annotations

import time
from collections import Counter

from samples import save

from ipnc_lab.sim.cluster import SimCluster

# (label, pods added per node index) per round
ROUNDS = [
    ("start: 10 pods on each node", (10, 10, 10)),
    ("30 more pods on node b only", (0, 30, 0)),
    ("60 more pods on node c only", (0, 0, 60)),
]


def main() -> None:
    rows = []
    with SimCluster(history_size=5000) as cluster:
        nodes = [cluster.add_node(f"ipnb{letter}") for letter in "abc"]
        quiet = ["--log-level", "warning"]
        controllers = [cluster.start_controller(n, quiet) for n in nodes]
        for controller in controllers:
            controller.wait_ready(30)
        on_node: Counter[str] = Counter()
        for label, added in ROUNDS:
            cluster.api.requests.clear()
            new = {}
            for node, count in zip(nodes, added, strict=True):
                first = on_node[node.name]
                new[node.name] = [cluster.add_pod(node, f"{node.name}-{first + i}") for i in range(count)]
                on_node[node.name] += count
            for node in nodes:
                cluster.wait_initialized(new[node.name], 120)
            time.sleep(1.0)  # the last Events land
            records = cluster.api.requests.records()
            for letter, node in zip("abc", nodes, strict=True):
                mine = Counter(f"{r.verb} {r.resource}" for r in records if r.node == node.name)
                rows.append({
                    "round": label, "node": letter, "added": len(new[node.name]),
                    "on_node": on_node[node.name], "in_cluster": sum(on_node.values()),
                    "requests": sum(mine.values()), "by_kind": dict(mine),
                })  # fmt: skip
        for controller in controllers:
            assert controller.terminate() == 0

    save("many_nodes", {"rows": rows})
    print("## Many nodes\n")
    print("Three simulated nodes with one controller each (own RBAC user, the chart's rules) against one API "
          "emulator. Each round adds mesh pods to some nodes and counts, from the emulator's request log, "
          "the requests each node's controller made during that round.\n")  # fmt: skip
    print("| round | node | pods added | pods on node | pods in cluster | requests in round | kinds |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(row["by_kind"].items())) or "none"
        print(f"| {row['round']} | {row['node']} | {row['added']} | {row['on_node']} | {row['in_cluster']} | "
              f"{row['requests']} | {kinds} |")  # fmt: skip
    print("\nA node that gets no new pods makes no request at all while the cluster grows; a node's requests "
          "are one patch and one Event per new pod on that node (its watch is filtered by "
          "`spec.nodeName`, so other nodes' pods never reach it).")  # fmt: skip


if __name__ == "__main__":
    main()
