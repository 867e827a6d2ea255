"""Issue 12 attack 1 end to end: the real controller (the chart's RBAC user) meets the issue's exact
injection strings in a pod's annotations, with the default backend and with --backend nftables.

The hostile pod is refused with one Warning that names the annotation and shows the value escaped; its
namespace gets no rule at all (no ATTACK chain, no filter table, no nft table); a benign pod on the same
node is initialized all the same; no Event anyone can read holds a raw control character or tool output.
"""

from __future__ import annotations

import pytest

from hostile_values import IPTABLES_ATTACK, NFT_ATTACK
from ipnc_lab.sim.cluster import SimCluster
from ipnc_lab.sim.controller import wait_for
from ipnc_lab.sim.netns import holds_capture_rules
from istio_pod_network_controller.dataplane import netns
from istio_pod_network_controller.dataplane.tools import run
from istio_pod_network_controller.settings import annotations as ann

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _everything_loaded() -> str:
    """Every rule system's full listing in the current namespace."""
    return "".join(
        run([tool]) for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save",
                                 "ip6tables-nft-save")
    ) + run(["nft", "list", "ruleset"])  # fmt: skip


@pytest.mark.parametrize(
    ("backend", "attack", "reason"),
    [
        ("auto", IPTABLES_ATTACK, "contains a control character"),
        ("nftables", NFT_ATTACK, "contains a control character"),
        ("nftables", "fe80::%lo return ip6 daddr ::1 accept", "an IPv6 scope (%zone) is not allowed"),
    ],
    ids=["iptables", "nftables", "nftables-one-line"],
)
def test_the_issue_attack_through_the_real_controller(backend: str, attack: str, reason: str) -> None:
    with SimCluster() as cluster:
        node = cluster.add_node("ipnsi")
        hostile = cluster.add_pod(
            node, "hostile", annotations={ann.IPV6: "capture", ann.EXCLUDE_OUTBOUND_IP_RANGES: attack}
        )
        benign = cluster.add_pod(node, "benign", annotations={ann.IPV6: "capture"})
        ctl = cluster.start_controller(node, ["--backend", backend, "--repair-interval", "1"])
        ctl.wait_ready()
        cluster.wait_initialized([benign], 20, ctl.log)
        wait_for(lambda: "InvalidInterceptionConfig" in cluster.reasons(hostile), 15, f"refusal\n{ctl.log()}")

        (warning,) = cluster.events(hostile)
        message = warning["message"]
        assert warning["type"] == "Warning"
        assert message.startswith(f"annotation {ann.EXCLUDE_OUTBOUND_IP_RANGES}: invalid value 'fe80::%lo")
        assert reason in message
        assert message.isprintable()  # the value's newlines are shown escaped: no forged line in the Event
        assert not cluster.initialized(hostile)
        assert hostile.netns and not holds_capture_rules(hostile.netns)
        loaded = netns.run_in(hostile.netns.pinned, _everything_loaded)
        for trace in ("ATTACK", "*filter", "--uid-owner 1000", "table inet", "ISTIO"):
            assert trace not in loaded, loaded

        for pod in (hostile, benign):
            for event in cluster.events(pod):
                assert event["message"].isprintable(), event
        assert ctl.terminate() == 0
