"""The demo, run for real (root): its table must say what the system did, and that must be right."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys

import pytest

from ipnc_lab.demo.run import Demo, DemoResult, run_demo

pytestmark = pytest.mark.root


@pytest.fixture(scope="module", params=["auto", "legacy", "nftables"])
def result(request: pytest.FixtureRequest) -> DemoResult:
    return run_demo(6, request.param, lambda _: None)


def by_name(result: DemoResult) -> dict[str, object]:
    return {o.pod.name: o for o in result.outcomes}


def test_mesh_pods_are_initialized_captured_and_their_waiters_pass(result: DemoResult) -> None:
    mesh = [o for o in result.outcomes if o.pod.mesh]
    assert {o.pod.name for o in mesh} == {"legacy-annotated", "in-legacy-namespace", "injected"}
    for o in mesh:
        assert o.marked_ms is not None, o.pod.name
        assert o.waiter_exit == 0, o.pod.name
        assert o.inbound is not None and o.inbound_captured, (o.pod.name, str(o.inbound))
        assert o.inbound.orig == (o.ip, 8080)
        assert o.outbound is not None and o.outbound_captured, (o.pod.name, str(o.outbound))
        assert o.outbound.orig is not None and o.outbound.orig[1] == 9090
        assert o.rules_present
        assert any(event.startswith("Normal Initialized") for event in o.events)


def test_non_mesh_pods_go_direct_and_hold_no_rules(result: DemoResult) -> None:
    plain = next(o for o in result.outcomes if o.pod.name == "plain")
    assert plain.marked_ms is None
    assert plain.inbound is not None and plain.inbound.label == "app"
    assert plain.outbound is not None and plain.outbound.label == "remote"
    assert plain.rules_present is False
    host = next(o for o in result.outcomes if o.pod.name == "host-network")
    assert host.marked_ms is None
    assert any(event.startswith("Warning HostNetworkSkipped") for event in host.events)
    assert result.host_rules_unchanged


def test_bad_annotation_pod_is_reported_untouched_and_never_starts(result: DemoResult) -> None:
    bad = next(o for o in result.outcomes if o.pod.name == "bad-annotation")
    assert bad.marked_ms is None
    assert bad.rules_present is False
    assert bad.waiter_exit == 4  # invalid annotation: the app container never starts
    assert bad.inbound is not None and not bad.inbound.ok
    warnings = [e for e in bad.events if e.startswith("Warning InvalidInterceptionConfig")]
    assert warnings and "excludeInboundPorts" in warnings[0] and "'8081,http'" in warnings[0]


def test_status_explains_the_example_pod(result: DemoResult) -> None:
    assert (
        "Selected:   yes: injected sidecar with the istio-pod-network-wait init container"
        in result.status_output
    )
    assert "matches the spec below" in result.status_output
    assert ": Ready (Running" in result.status_output


def test_controller_used_one_patch_per_mesh_pod_and_no_gets(result: DemoResult) -> None:
    assert result.controller_requests.get("patch pods") == 3
    gets = {key: n for key, n in result.controller_requests.items() if key.startswith("get ")}
    assert gets == {"get nodes": 1}  # its own Node, once at start (a wrong --node-name is warned about)
    assert result.controller_exit == 0


def test_demo_command_prints_the_table_and_leaves_nothing_behind() -> None:
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    done = subprocess.run(
        [sys.executable, "-m", "ipnc_lab", "demo"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "captured → envoy-in" in done.stdout and "direct → app" in done.stdout
    assert "host network namespace rules: unchanged" in done.stdout
    assert "$ istio-pod-network-controller status injected -n demo" in done.stdout
    assert "Verdict:    initialized: capture rules installed for this spec" in done.stdout
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    demo_names = re.compile(r"^d\d+-(node|p\d+)\b")
    left = [line for line in after.splitlines() if demo_names.match(line) and line not in before.splitlines()]
    assert not left


def test_kept_demo_says_each_step_once_and_its_status_command_works() -> None:
    said: list[str] = []
    explored: dict[str, object] = {}

    def keep(demo: Demo) -> None:
        commands = demo.explore_commands()
        (status_line,) = [c for c in commands if " status " in c]
        explored["status"] = subprocess.run(
            shlex.split(status_line.split("    #")[0]),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        explored["commands"] = commands

    run_demo(6, "auto", said.append, keep=keep)
    assert all(a != b for a, b in itertools.pairwise(said)), said  # no line repeated while polling
    assert any("--repair-interval 0" in line for line in said)
    done = explored["status"]
    assert isinstance(done, subprocess.CompletedProcess)
    assert done.returncode == 0 and "Verdict:" in done.stdout, done.stdout + done.stderr
