"""The backends behind the command seam: golden files of the exact tool commands each operation runs
(fresh namespace, a re-apply, the legacy→nft switch, TPROXY routes, clean), recorded without root; and,
beside them, the same scenarios run for real in scratch namespaces through a recorder that delegates.

Regenerate after an intended change with `UPDATE_GOLDEN=1` and review the diff.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from command_recorder import RecordingRunner
from istio_pod_network_controller.dataplane import netns
from istio_pod_network_controller.dataplane.apply import ALL_ROUTES
from istio_pod_network_controller.dataplane.backends import (
    IptablesBackend,
    NftablesBackend,
    sync_routes,
)
from istio_pod_network_controller.dataplane.tools import run
from istio_pod_network_controller.netlink import FibRule
from istio_pod_network_controller.rules import iptables, plan
from istio_pod_network_controller.rules.model import Ruleset
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.spec import TPROXY_MARK, TPROXY_ROUTE_TABLE, build_spec

GOLDEN = Path(__file__).parent / "golden" / "seam"
DEFAULT = plan.build(build_spec({ann.IPV6: "capture"}))
TPROXY = plan.build(build_spec({ann.IPV6: "capture", ann.INTERCEPTION_MODE: "TPROXY"}))
DROP_INVALID = plan.build(build_spec({ann.IPV6: "capture"}, {"drop_invalid": "true"}))
OUR_FIB_RULES = [FibRule(4, TPROXY_MARK, TPROXY_ROUTE_TABLE), FibRule(6, TPROXY_MARK, TPROXY_ROUTE_TABLE)]


def _saved(variant: str, ruleset: Ruleset) -> dict[str, str]:
    """Canned `*-save` output of a namespace holding `ruleset` (our render parses as save output)."""
    outputs = {}
    for family in ruleset.families:
        prefix = "ip" if family.family == 4 else "ip6"
        outputs[f"{prefix}tables-{variant}-save"] = iptables.render(family)
    return outputs


def fresh_legacy(runner: RecordingRunner) -> None:
    IptablesBackend("legacy", runner).apply(DEFAULT, present=False)


def fresh_nftables(runner: RecordingRunner) -> None:
    NftablesBackend(runner).apply(DEFAULT, present=False)


def reapply_nft(runner: RecordingRunner) -> None:
    IptablesBackend("nft", runner).apply(DEFAULT, present=True)


def drop_invalid_off(runner: RecordingRunner) -> None:
    """Re-apply without drop-invalid over rules with it: ISTIO_DROP and its mangle jump go, nothing else."""
    IptablesBackend("nft", runner).apply(DEFAULT, present=True)


def legacy_to_nft(runner: RecordingRunner) -> None:
    """What apply() runs when the namespace holds our legacy rules and the backend is now nft."""
    IptablesBackend("nft", runner).apply(DEFAULT, present=False)
    IptablesBackend("legacy", runner).clean()


def tproxy_routes_fresh(runner: RecordingRunner) -> None:
    sync_routes(TPROXY.routes, all_ours=ALL_ROUTES, runner=runner, read_rules=list)


def tproxy_routes_again(runner: RecordingRunner) -> None:
    sync_routes(TPROXY.routes, all_ours=ALL_ROUTES, runner=runner, read_rules=lambda: list(OUR_FIB_RULES))


def clean(runner: RecordingRunner) -> None:
    """`rules clean` on a namespace with ours in every backend and TPROXY routes."""
    IptablesBackend("legacy", runner).clean()
    IptablesBackend("nft", runner).clean()
    NftablesBackend(runner).clean()
    sync_routes((), all_ours=ALL_ROUTES, flush=True, runner=runner, read_rules=lambda: list(OUR_FIB_RULES))


SCENARIOS: dict[str, tuple[Callable[[RecordingRunner], None], dict[str, str]]] = {
    "fresh-legacy": (fresh_legacy, {}),
    "fresh-nftables": (fresh_nftables, {}),
    "reapply-nft": (reapply_nft, _saved("nft", DEFAULT)),
    "legacy-to-nft": (legacy_to_nft, _saved("legacy", DEFAULT)),
    "drop-invalid-off": (drop_invalid_off, _saved("nft", DROP_INVALID)),
    "tproxy-routes-fresh": (tproxy_routes_fresh, {}),
    "tproxy-routes-again": (tproxy_routes_again, {}),
    "clean": (clean, {**_saved("legacy", TPROXY), **_saved("nft", DEFAULT)}),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_command_sequence_golden(name: str) -> None:
    scenario, outputs = SCENARIOS[name]
    runner = RecordingRunner(outputs)
    scenario(runner)
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(runner.transcript())
    assert runner.transcript() == path.read_text()


def test_a_fresh_namespace_reads_nothing_before_writing() -> None:
    """present=False means no `*-save` and no listing: one restore per family, one nft transaction."""
    for scenario in (fresh_legacy, fresh_nftables):
        runner = RecordingRunner()
        scenario(runner)
        assert not [c for c in runner.commands() if "save" in c or " list " in c]


def test_the_switch_removes_exactly_the_legacy_copy() -> None:
    runner = RecordingRunner(_saved("legacy", DEFAULT))
    legacy_to_nft(runner)
    legacy_restores = [c for c in runner.calls if c.argv[0].endswith("tables-legacy-restore")]
    assert len(legacy_restores) == 2
    for call in legacy_restores:
        assert call.stdin is not None
        assert "-X ISTIO_OUTPUT" in call.stdin and "-A ISTIO" not in call.stdin and "-I " not in call.stdin


@pytest.mark.root
@pytest.mark.parametrize("name", ["fresh-legacy", "fresh-nftables", "tproxy-routes-fresh"])
def test_the_golden_sequence_is_what_really_runs(name: str) -> None:
    """In a scratch namespace the real tools accept the recorded sequence, command for command."""
    scenario, _ = SCENARIOS[name]
    runner = RecordingRunner(delegate=run)

    def work() -> None:
        run(["ip", "link", "set", "lo", "up"])  # a pod's lo is up; TPROXY's local route needs it
        scenario(runner)

    netns.run_in_scratch(work)
    assert runner.transcript() == (GOLDEN / f"{name}.txt").read_text()


@pytest.mark.root
def test_the_real_legacy_to_nft_switch_runs_the_golden_commands() -> None:
    """With real save output (the tool's own spelling), the commands are the golden ones and no copy of
    ours is left in legacy."""

    def work() -> tuple[list[str], list[str]]:
        IptablesBackend("legacy").apply(DEFAULT, present=False)
        runner = RecordingRunner(delegate=run)
        legacy_to_nft(runner)
        return runner.commands(), IptablesBackend("legacy").drift(Ruleset((), ()))

    commands, leftover = netns.run_in_scratch(work)
    golden = [
        line[2:] for line in (GOLDEN / "legacy-to-nft.txt").read_text().splitlines() if line[:2] == "$ "
    ]
    assert commands == golden
    assert leftover == []
