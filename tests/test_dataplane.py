"""apply / verify / clean against real network namespaces, for every backend (root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from istio_pod_network_controller.dataplane import apply as dp
from istio_pod_network_controller.dataplane.netns import PinnedNetns
from istio_pod_network_controller.errors import HostNetnsRefused
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import build_spec

pytestmark = pytest.mark.root
BACKENDS = ["legacy", "nft", "nftables"]
FULL = build_spec({ann.INTERCEPTION_MODE: "TPROXY", ann.CAPTURE_DNS: "true", ann.IPV6: "capture"})
DEFAULT = build_spec({ann.IPV6: "block"})


def sh(ns: str, *argv: str, check: bool = True) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check
    ).stdout


def state(ns: str, backend: str) -> str:
    """Everything a backend holds in the namespace (counters and comments stripped), plus policy rules."""
    if backend == "nftables":
        text = sh(ns, "nft", "list", "ruleset")
    else:
        text = sh(ns, f"iptables-{backend}-save") + sh(ns, f"ip6tables-{backend}-save")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(lines) + sh(ns, "ip", "-4", "rule") + sh(ns, "ip", "-6", "rule")


def add_foreign(ns: str, backend: str) -> None:
    if backend == "nftables":
        sh(ns, "nft", "add", "table", "inet", "foreign")
        sh(ns, "nft", "add", "chain", "inet", "foreign", "out", "{ type nat hook output priority -100; }")
        sh(ns, "nft", "add", "rule", "inet", "foreign", "out", "udp", "dport", "9999", "return")
    else:
        sh(ns, f"iptables-{backend}", "-t", "nat", "-N", "FOREIGN")
        sh(
            ns,
            f"iptables-{backend}",
            "-t",
            "nat",
            "-A",
            "FOREIGN",
            "-p",
            "udp",
            "--dport",
            "9999",
            "-j",
            "RETURN",
        )
        sh(ns, f"iptables-{backend}", "-t", "nat", "-A", "OUTPUT", "-j", "FOREIGN")
        sh(ns, f"iptables-{backend}", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "RETURN")


def foreign_intact(ns: str, backend: str) -> bool:
    if backend == "nftables":
        return "udp dport 9999 return" in sh(ns, "nft", "list", "table", "inet", "foreign")
    text = sh(ns, f"iptables-{backend}-save")
    return all(
        line in text
        for line in ("-A OUTPUT -j FOREIGN", "-A FOREIGN -p udp -m udp --dport 9999 -j RETURN",
                     "-A PREROUTING -p udp -j RETURN")
    )  # fmt: skip


@pytest.fixture
def pinned(netns_name: str) -> Iterator[PinnedNetns]:
    with PinnedNetns.open_path(f"/run/netns/{netns_name}") as handle:
        yield handle


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_three_times_leaves_one_copy(netns_name: str, pinned: PinnedNetns, backend: str) -> None:
    add_foreign(netns_name, backend)
    first = dp.apply(pinned, FULL, backend)  # type: ignore[arg-type]
    once = state(netns_name, backend)
    dp.apply(pinned, FULL, backend)  # type: ignore[arg-type]
    dp.apply(pinned, FULL, backend)  # type: ignore[arg-type]
    assert state(netns_name, backend) == once
    assert first.backend == backend and first.ipv6_captured
    assert once.count("ISTIO_TPROXY") >= 2 and "lookup 133" in once
    assert sh(netns_name, "ip", "-4", "rule").count("lookup 133") == 1
    assert sh(netns_name, "ip", "-6", "rule").count("lookup 133") == 1
    assert dp.verify(pinned, FULL, backend).in_place  # type: ignore[arg-type]
    assert foreign_intact(netns_name, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_spec_replaces_ours_and_keeps_foreign(
    netns_name: str, pinned: PinnedNetns, backend: str
) -> None:
    add_foreign(netns_name, backend)
    dp.apply(pinned, FULL, backend)  # type: ignore[arg-type]
    dp.apply(pinned, DEFAULT, backend)  # type: ignore[arg-type]
    after = state(netns_name, backend)
    assert "tproxy" not in after.lower()
    assert "ISTIO_DIVERT" not in after and "OUTPUT_DNS" not in after and "lookup 133" not in after
    assert dp.verify(pinned, DEFAULT, backend).in_place  # type: ignore[arg-type]
    assert not dp.verify(pinned, FULL, backend).in_place  # type: ignore[arg-type]
    assert foreign_intact(netns_name, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_reports_a_deleted_rule_and_reapply_repairs(
    netns_name: str, pinned: PinnedNetns, backend: str
) -> None:
    dp.apply(pinned, DEFAULT, backend)  # type: ignore[arg-type]
    if backend == "nftables":
        handles = sh(
            netns_name, "nft", "-a", "list", "chain", "inet", "istio_pod_network", "nat4_ISTIO_REDIRECT"
        )
        handle = handles.split("# handle ")[-1].split()[0]
        sh(
            netns_name,
            "nft",
            "delete",
            "rule",
            "inet",
            "istio_pod_network",
            "nat4_ISTIO_REDIRECT",
            "handle",
            handle,
        )
        where = "redirect to :15001"
    else:
        sh(netns_name, f"iptables-{backend}", "-t", "nat", "-D", "ISTIO_REDIRECT", "1")
        where = "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"
    drift = dp.verify(pinned, DEFAULT, backend)  # type: ignore[arg-type]
    assert not drift.in_place
    assert where in drift.report
    dp.apply(pinned, DEFAULT, backend)  # type: ignore[arg-type]
    assert dp.verify(pinned, DEFAULT, backend).in_place  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_verify_reports_a_rule_placed_before_our_jump(
    netns_name: str, pinned: PinnedNetns, backend: str
) -> None:
    dp.apply(pinned, DEFAULT, backend)  # type: ignore[arg-type]
    sh(netns_name, f"iptables-{backend}", "-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp", "-j", "RETURN")
    drift = dp.verify(pinned, DEFAULT, backend)  # type: ignore[arg-type]
    assert "nat OUTPUT: jumps into our chains must be the first rules" in drift.report
    assert "(position 2)" in drift.report


@pytest.mark.parametrize("backend", BACKENDS)
def test_clean_removes_ours_and_only_ours(netns_name: str, pinned: PinnedNetns, backend: str) -> None:
    add_foreign(netns_name, backend)
    dp.apply(pinned, FULL, backend)  # type: ignore[arg-type]
    dp.clean(pinned, backend)  # type: ignore[arg-type]
    after = state(netns_name, backend)
    assert "ISTIO" not in after and "istio_pod_network" not in after and "lookup 133" not in after
    assert foreign_intact(netns_name, backend)


def test_switching_backend_removes_the_other_copy(netns_name: str, pinned: PinnedNetns) -> None:
    dp.apply(pinned, DEFAULT, "legacy")
    dp.apply(pinned, DEFAULT, "nftables")
    assert "ISTIO" not in sh(netns_name, "iptables-legacy-save")
    assert "istio_pod_network" in sh(netns_name, "nft", "list", "tables")
    drift = dp.verify(pinned, DEFAULT, "nftables")
    assert drift.in_place, drift.report
    dp.apply(pinned, DEFAULT, "nft")
    assert "istio_pod_network" not in sh(netns_name, "nft", "list", "tables")


def test_verify_reports_a_leftover_copy_in_another_backend(netns_name: str, pinned: PinnedNetns) -> None:
    dp.apply(pinned, DEFAULT, "nftables")
    sh(netns_name, "iptables-nft", "-t", "nat", "-N", "ISTIO_OUTPUT")
    drift = dp.verify(pinned, DEFAULT, "nftables")
    assert "nft: IPv4 nat: chain ISTIO_OUTPUT should not exist" in drift.report


def test_auto_keeps_what_the_namespace_uses(netns_name: str, pinned: PinnedNetns) -> None:
    assert dp.apply(pinned, DEFAULT).backend == dp.host_backend()
    dp.clean(pinned)
    sh(netns_name, "iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "udp", "-j", "RETURN")
    assert dp.apply(pinned, DEFAULT).backend == "legacy"
    assert dp.verify(pinned, DEFAULT).in_place


def test_none_mode_removes_everything_of_ours(netns_name: str, pinned: PinnedNetns) -> None:
    dp.apply(pinned, FULL, "legacy")
    dp.apply(pinned, build_spec({ann.INTERCEPTION_MODE: "NONE"}), "legacy")
    assert "ISTIO" not in state(netns_name, "legacy")


def test_ipv6_auto_captures_only_with_a_global_address(netns_name: str, pinned: PinnedNetns) -> None:
    assert not dp.apply(pinned, build_spec({}), "legacy").ipv6_captured
    assert "ISTIO_BLOCK_INBOUND" in sh(netns_name, "ip6tables-legacy-save")
    sh(netns_name, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")  # no dummy module here
    sh(netns_name, "ip", "addr", "add", "fd00:252::1/128", "dev", "d0", "nodad")
    assert dp.apply(pinned, build_spec({}), "legacy").ipv6_captured
    v6 = sh(netns_name, "ip6tables-legacy-save")
    assert "ISTIO_BLOCK_INBOUND" not in v6 and "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN" in v6
    assert "inet6 ::6/128" in sh(netns_name, "ip", "-6", "addr", "show", "dev", "lo")
    dp.clean(pinned)
    assert "::6/128" not in sh(netns_name, "ip", "-6", "addr", "show", "dev", "lo")


def test_host_netns_is_refused_without_override() -> None:
    before = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True, check=True).stdout
    with PinnedNetns.open_pid(os.getpid()) as host:
        with pytest.raises(HostNetnsRefused, match="host's network namespace"):
            dp.apply(host, DEFAULT, "legacy")
        with pytest.raises(HostNetnsRefused):
            dp.verify(host, DEFAULT, "legacy")
        with pytest.raises(HostNetnsRefused):
            dp.clean(host, "legacy")
    after = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True, check=True).stdout
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("#")]  # noqa: E731
    assert strip(before) == strip(after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sweep_of_a_node_namespace_removes_exactly_ours(
    netns_name: str, pinned: PinnedNetns, backend: str
) -> None:
    """A scratch namespace stands for the node's: its own rules and a policy rule of its own stay."""
    add_foreign(netns_name, backend)
    sh(netns_name, "ip", "-4", "rule", "add", "fwmark", "0x99", "lookup", "99")
    assert dp.sweep_node(pinned) == []
    dp.apply(pinned, FULL, backend)  # type: ignore[arg-type]
    found = dp.sweep_node(pinned)
    assert any("ISTIO" in line or "istio_pod_network" in line for line in found), found
    assert any("policy rule" in line for line in found), found
    after = state(netns_name, backend)
    assert "ISTIO" not in after and "istio_pod_network" not in after and "lookup 133" not in after
    assert foreign_intact(netns_name, backend)
    assert "fwmark 0x99 lookup 99" in sh(netns_name, "ip", "-4", "rule")
    assert dp.sweep_node(pinned) == []
