"""Preflight: each decision from what a probe saw, and `check` against the API emulator's access reviews."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ipnc_lab.localapi.server import ThreadedServer
from istio_pod_network_controller.cli import exitcodes
from istio_pod_network_controller.controller import preflight as pf
from istio_pod_network_controller.install import rbac

ALL_CAPS = sum(1 << bit for bit in pf.CAPABILITIES.values())
NEEDED = pf.required_access(rbac.CLUSTER_ROLE_RULES)


def test_capabilities_from_capeff() -> None:
    assert pf.parse_capeff("Name:\tx\nCapEff:\t000001ffffffffff\n") == 0x1FFFFFFFFFF
    assert pf.parse_capeff("CapEff:\tzz\n") is None
    assert pf.decide_capabilities(ALL_CAPS).ok
    without = ALL_CAPS & ~(1 << pf.CAPABILITIES["SYS_PTRACE"])
    check = pf.decide_capabilities(without)
    assert not check.ok and "SYS_PTRACE" in check.detail and "NET_ADMIN" not in check.detail
    assert "capabilities.add: [SYS_PTRACE]" in check.fix
    assert pf.missing_privileges(["SYS_ADMIN"], ALL_CAPS) is None
    message = pf.missing_privileges(["SYS_ADMIN", "NET_ADMIN"], 0)
    assert (
        message is not None
        and "EPERM" in message
        and "CAP_SYS_ADMIN" in message
        and "CAP_NET_ADMIN" in message
    )


def test_proc_root_decisions() -> None:
    assert not pf.decide_proc("/x", pf.ProcView(error="no such directory")).ok
    assert "not a proc filesystem" in pf.decide_proc("/x", pf.ProcView()).detail
    own = pf.decide_proc("/proc", pf.ProcView(processes=3, cgroups=1, own_cgroup_only=True))
    assert not own.ok and "hostPID" in own.fix
    assert pf.decide_proc("/proc", pf.ProcView(processes=90, cgroups=12)).ok


def test_proc_root_probe(tmp_path: Path) -> None:
    assert pf.probe_proc("/nonexistent").error == "no such directory"
    assert pf.probe_proc(str(tmp_path)).processes == 0
    view = pf.probe_proc("/proc")
    assert view.processes > 1 and view.error is None


def test_tools_follow_the_backend() -> None:
    every = {tool: True for tools in pf.TOOLS.values() for tool in tools} | {"ip": True}
    assert pf.decide_tools("auto", "nft", every).ok
    no_legacy = {**every, "iptables-legacy-restore": False}
    assert pf.decide_tools("auto", "nft", no_legacy).ok
    check = pf.decide_tools("auto", "legacy", no_legacy)
    assert not check.ok and "node uses legacy; missing iptables-legacy-restore" in check.detail
    assert not pf.decide_tools("nftables", "legacy", {**every, "nft": False}).ok
    assert not pf.decide_tools("auto", "nft", {**every, "ip": False}).ok


def test_access_decisions() -> None:
    server = "https://api:6443"
    unreachable = pf.decide_access(server, [], pf.ApiProblem(0, "connection refused"))
    assert unreachable.detail == f"cannot reach the API server {server}: connection refused"
    assert "401" in pf.decide_access(server, [], pf.ApiProblem(401, "Unauthorized")).detail
    assert not pf.decide_access(server, [], pf.ApiProblem(500, "etcd")).ok
    refused = pf.decide_access(server, [], pf.ApiProblem(403, "forbidden"))
    assert refused.ok and "verbs not checked" in refused.detail  # reachable: the informers will tell more
    answers = [pf.Access(a.group, a.resource, a.verb, a.resource != "events") for a in NEEDED]
    denied = pf.decide_access(server, answers, None)
    assert not denied.ok and "create events" in denied.detail and "ClusterRole" in denied.fix
    assert pf.decide_access(server, [pf.Access(a.group, a.resource, a.verb, True) for a in NEEDED], None).ok


def test_report_reason_and_node_event() -> None:
    report = pf.Report((pf.Check("a", True, "fine"), pf.Check("b", False, "broken", "mend it")))
    assert not report.ok and report.reason() == "b: broken; fix: mend it"
    event = pf.node_event("node-1", "preflight failed: b: broken")
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": "node-1", "uid": "node-1"}
    assert event["type"] == "Warning" and event["reason"] == pf.PREFLIGHT_FAILED
    assert (
        pf.node_event("node-1", "same")["metadata"]["name"]
        == pf.node_event("node-1", "same")["metadata"]["name"]
    )


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "istio_pod_network_controller", "check", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.root
def test_check_passes_with_the_charts_cluster_role(api: ThreadedServer, tmp_path: Path) -> None:
    user = api.add_user("ipnc", "ipnc-token", rbac.cluster_role_rules())
    done = check("--kubeconfig", str(api.api.write_kubeconfig(tmp_path / "kc", user)))
    assert done.returncode == exitcodes.OK, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["ok"] * 4
    assert any(line.startswith("ok    rule tools: node uses ") for line in lines)
    assert f"ok    API access: {api.url}: allowed to get pods" in done.stdout


@pytest.mark.root
def test_check_names_the_missing_verb_and_a_bad_proc_root(api: ThreadedServer, tmp_path: Path) -> None:
    rules = [r for r in rbac.cluster_role_rules() if r["resources"] != ["events"]]
    user = api.add_user("partial", "partial-token", rules)
    done = check(
        "--kubeconfig", str(api.api.write_kubeconfig(tmp_path / "kc", user)), "--proc-root", "/nonexistent"
    )
    assert done.returncode == exitcodes.PREFLIGHT
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 2, done.stdout
    assert "/proc root /nonexistent: no such directory; fix: mount the node's /proc" in failures[0]
    assert "not allowed to create events;" in failures[1]
    assert "Traceback" not in done.stderr


def test_check_node_local_only() -> None:
    done = check("--no-api", "--proc-root", "/nonexistent")
    assert done.returncode == exitcodes.PREFLIGHT and "API access" not in done.stdout
