"""The waiter's pure parts: probe choice, backoff, file and spec errors, the loop with fakes."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from istio_pod_network_controller.cli import cli
from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.settings.addresses import (
    LOOPBACK,
    PASSTHROUGH,
    has_global_ipv6,
    has_passthrough_v6,
    read_if_inet6,
)
from istio_pod_network_controller.settings.spec import build_spec
from istio_pod_network_controller.waiter import exitcodes
from istio_pod_network_controller.waiter.probe import Outcome
from istio_pod_network_controller.waiter.probeplan import Path as ProbePath
from istio_pod_network_controller.waiter.probeplan import ProbePlan, plan_probe
from istio_pod_network_controller.waiter.wait import (
    CONTROLLER_SELECTOR,
    MAX_INTERVAL,
    Config,
    Failure,
    Snapshot,
    Waiter,
    heartbeat_line,
    next_interval,
    read_file,
    resolve_spec,
    timeout_message,
)

PROXY = 1337


# --- which probe -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod", "global_v6", "families"),
    [
        ({}, False, (4,)),
        ({}, True, (4, 6)),
        ({ann.IPV6: "capture"}, False, (4, 6)),
        ({ann.IPV6: "block"}, True, (4,)),
        ({ann.INTERCEPTION_MODE: "TPROXY"}, False, (4,)),
        ({ann.INCLUDE_OUTBOUND_IP_RANGES: ""}, False, (4,)),
        ({ann.INCLUDE_INBOUND_PORTS: "8080,9090"}, False, (4,)),
        ({ann.INCLUDE_INBOUND_PORTS: ""}, False, (4,)),
        ({ann.INCLUDE_INBOUND_PORTS: "", ann.INTERCEPTION_MODE: "TPROXY"}, True, (4, 6)),
    ],
)
def test_loopback_probe_applies(pod: dict[str, str], global_v6: bool, families: tuple[int, ...]) -> None:
    plan = plan_probe(build_spec(pod), PROXY, PROXY, global_v6)
    assert plan.families == families
    assert plan.proves_ipv6_block == (6 not in families)  # not captured means blocked, and proven so
    for target in plan.targets:
        if target.path is ProbePath.BLOCKED:
            assert (target.family, target.port) == (6, 15002)
            continue
        assert target.path is ProbePath.LOOPBACK
        assert (target.listen_port, target.other_port, target.port) == (15006, 15001, 15002)
        assert (target.source, target.address) == (LOOPBACK[target.family], PASSTHROUGH[target.family])


@pytest.mark.parametrize(
    ("pod", "euid", "egid", "reason"),
    [
        ({}, 1000, PROXY, "but with the proxy gid 1337"),
        ({ann.ENVOY_USERID: "1338"}, PROXY, PROXY, "not the proxy uid 1338, but with the proxy gid"),
        ({ann.EXCLUDE_INTERFACES: "eth0,lo"}, PROXY, PROXY, "excludeInterfaces contains lo"),
        ({ann.INCLUDE_OUTBOUND_IP_RANGES: ""}, 1000, 1000, "outbound capture is off"),
        ({ann.EXCLUDE_OUTBOUND_IP_RANGES: "0.0.0.0/0"}, 1000, 1000, "no IPv4 destination"),
        ({ann.EXCLUDE_OUTBOUND_PORTS: ",".join(str(p) for p in range(15000, 15070))}, PROXY, PROXY,
         "every candidate probe port"),
    ],
)  # fmt: skip
def test_no_probe_for_a_capturing_spec(pod: dict[str, str], euid: int, egid: int, reason: str) -> None:
    plan = plan_probe(build_spec(pod), euid, egid, True)
    assert plan.targets == () and plan.captures
    assert reason in plan.reason


def test_only_interception_none_needs_no_probe() -> None:
    plan = plan_probe(build_spec({ann.INTERCEPTION_MODE: "NONE"}), PROXY, PROXY, False)
    assert plan.targets == () and not plan.captures
    assert "installs no capture rules" in plan.reason
    nothing_included = {ann.INCLUDE_INBOUND_PORTS: "", ann.INCLUDE_OUTBOUND_IP_RANGES: ""}
    assert plan_probe(build_spec(nothing_included), PROXY, PROXY, False).families == (4,)


@pytest.mark.parametrize(
    ("pod", "families", "address", "port"),
    [
        ({ann.ENVOY_USERID: "1338", ann.ENVOY_GROUPID: "1338"}, (4,), "192.0.2.1", 15002),
        ({ann.ENVOY_USERID: "1338", ann.ENVOY_GROUPID: "1338", ann.IPV6: "capture"}, (4, 6), "192.0.2.1",
         15002),
        ({ann.EXCLUDE_OUTBOUND_IP_RANGES: "192.0.2.0/24"}, (4,), "198.51.100.1", 15002),
        ({ann.INCLUDE_OUTBOUND_IP_RANGES: "10.96.0.0/12,fd00::/108"}, (4,), "10.96.0.1", 15002),
        ({ann.INCLUDE_OUTBOUND_IP_RANGES: "10.96.0.7/32"}, (4,), "10.96.0.7", 15002),
        ({ann.INCLUDE_OUTBOUND_IP_RANGES: "", ann.INCLUDE_OUTBOUND_PORTS: "443,8443",
          ann.EXCLUDE_OUTBOUND_PORTS: "443"}, (4,), "192.0.2.1", 8443),
        ({ann.INCLUDE_INBOUND_PORTS: ""}, (4,), "192.0.2.1", 15002),
    ],
)  # fmt: skip
def test_outbound_probe_for_another_uid_and_gid(
    pod: dict[str, str], families: tuple[int, ...], address: str, port: int
) -> None:
    plan = plan_probe(
        build_spec(pod),
        1337 if ann.ENVOY_USERID in pod else 1000,
        1337 if ann.ENVOY_USERID in pod else 1000,
        False,
    )
    assert plan.families == families
    first = plan.targets[0]
    assert (first.path, first.source, first.address, first.port) == (ProbePath.OUTBOUND, None, address, port)
    assert (first.listen_port, first.other_port, first.hop_limit) == (15001, 15006, 1)
    if 6 in families:
        assert plan.targets[1].address == "2001:db8::1"


def test_probe_follows_ports_and_uid() -> None:
    plan = plan_probe(build_spec({ann.ENVOY_PORT: "15100", ann.ENVOY_USERID: "2000"}), 2000, PROXY, False)
    assert plan.families == (4,)
    assert (plan.targets[0].listen_port, plan.targets[0].other_port) == (15100, 15100)
    excluded = plan_probe(build_spec({ann.EXCLUDE_OUTBOUND_PORTS: "15002,15003"}), PROXY, PROXY, False)
    assert excluded.targets[0].port == 15004
    flags = plan_probe(build_spec({}, {"inbound_port": "15200"}), PROXY, PROXY, False)
    assert flags.targets[0].listen_port == 15200


def test_if_inet6_parsing() -> None:
    rows = [
        ["00000000000000000000000000000001", "01", "80", "10", "80", "lo"],
        ["00000000000000000000000000000006", "01", "80", "10", "80", "lo"],
        ["fe800000000000000000000000000001", "02", "40", "20", "80", "a0"],
    ]
    assert not has_global_ipv6(rows)
    assert has_passthrough_v6(rows)
    rows.append(["20010db8000100000000000000000002", "02", "40", "00", "80", "a0"])
    assert has_global_ipv6(rows)
    assert not has_passthrough_v6(rows[:1])


def test_if_inet6_with_an_interface_name_that_is_not_utf8(tmp_path: Path) -> None:
    """Interface names are the pod's to choose: any bytes, never an exception."""
    path = tmp_path / "if_inet6"
    path.write_bytes(b"20010db8000100000000000000000002 03 40 00 80 e\xff\xfe\n")
    rows = read_if_inet6(str(path))
    assert has_global_ipv6(rows) and rows[0][5] == "e\udcff\udcfe"


# --- timing ------------------------------------------------------------------------------------------------


def test_backoff_starts_fast_and_is_capped() -> None:
    assert next_interval(0.0) <= 0.020
    waits = [next_interval(t / 100) for t in range(0, 10_000)]
    assert waits == sorted(waits)
    assert max(waits) == MAX_INTERVAL <= 0.5


# --- file and spec errors ----------------------------------------------------------------------------------


def test_read_file(tmp_path: Path) -> None:
    missing = read_file(str(tmp_path / "absent"))
    assert (missing.present, missing.annotations) == (False, {})
    good = tmp_path / "good"
    good.write_text(f'{ann.STATUS}="initialized"\n')
    assert read_file(str(good)).annotations == {ann.STATUS: "initialized"}
    for content, expected in ((b"garbage\n", "expected key="), (b'a="\xff"\n', "not UTF-8")):
        bad = tmp_path / "bad"
        bad.write_bytes(content)
        with pytest.raises(Failure) as caught:
            read_file(str(bad))
        assert caught.value.code == exitcodes.BAD_FILE and expected in caught.value.message
    with pytest.raises(Failure) as caught:
        read_file(str(tmp_path))
    assert caught.value.code == exitcodes.BAD_FILE and "Is a directory" in caught.value.message


def test_resolve_spec_ignores_overrides_as_the_controller_does() -> None:
    notes = {ann.ENVOY_USERID: "1000", ann.ENVOY_GROUPID: "1000", ann.IPV6: "block", ann.ENVOY_PORT: "15100"}
    honoured = resolve_spec(Config(), notes)
    assert (honoured.proxy_uid, honoured.ipv6.value) == (1000, "block")
    ignored = resolve_spec(Config(ignore_pod_overrides=True), notes)
    assert (ignored.proxy_uid, ignored.proxy_gid, ignored.ipv6.value) == (1337, 1337, "auto")
    assert ignored.inbound_port == 15100  # only the gated keys are ignored


def test_resolve_spec_errors() -> None:
    with pytest.raises(Failure) as caught:
        resolve_spec(Config(defaults={"inbound_port": "0"}), {})
    assert caught.value.code == exitcodes.USAGE and "--inbound-port" in caught.value.message
    with pytest.raises(Failure) as caught:
        resolve_spec(Config(), {ann.INCLUDE_INBOUND_PORTS: "http"})
    assert caught.value.code == exitcodes.BAD_ANNOTATION
    assert f"annotation {ann.INCLUDE_INBOUND_PORTS}: invalid value 'http'" in caught.value.message


def test_exit_codes_are_distinct() -> None:
    codes = [code for code, _ in exitcodes.TABLE]
    assert len(codes) == len(set(codes))


def test_waiter_md_and_help_list_the_same_codes_and_agree_on_5() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "waiter.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.*) \|$", page, re.MULTILINE))
    assert {int(code) for code in rows} == {code for code, _ in exitcodes.TABLE}
    helped = dict(exitcodes.TABLE)[exitcodes.PROBE_UNAVAILABLE]
    for text in (rows["5"], helped):
        assert "--trust-annotation" in text and "--require-probe" in text, text


# --- the loop with fakes -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeProbe:
    def __init__(self, label: str, succeed_at: int | None) -> None:
        self.label = label
        self.succeed_at = succeed_at
        self.attempts = 0
        self.closed = False

    def describe(self) -> str:
        return f"{self.label}: fake"

    def attempt(self) -> Outcome:
        self.attempts += 1
        if self.succeed_at is not None and self.attempts >= self.succeed_at:
            return Outcome(True, f"{self.label} captured", f"{self.label}: captured")
        return Outcome(False, f"{self.label} refused", f"{self.label}: refused #{self.attempts}")

    def close(self) -> None:
        self.closed = True


BLOCK = 0
"""make_waiter's key of the IPv6-block probe (absent: one that proves the block at once)."""


def make_waiter(
    tmp_path: Path,
    annotations: dict[str, str] | None,
    probes: dict[int, FakeProbe],
    *,
    euid: int = PROXY,
    egid: int = PROXY,
    **config: object,
) -> tuple[Waiter, FakeClock, io.StringIO]:
    probes = {BLOCK: FakeProbe("IPv6 block", 1), **probes}
    path = tmp_path / "pod_annotations"
    if annotations is not None:
        path.write_text("".join(f'{k}="{v}"\n' for k, v in annotations.items()))
    clock = FakeClock()
    err = io.StringIO()
    waiter = Waiter(
        Config(file=str(path), **config),  # type: ignore[arg-type]
        err=err,
        clock=clock,
        sleep=clock.sleep,
        euid=euid,
        egid=egid,
        global_ipv6=lambda: False,
        make_probe=lambda target, _plan: probes[BLOCK if target.path is ProbePath.BLOCKED else target.family],
        environ={"HOSTNAME": "app-0", "POD_NAMESPACE": "shop"},
    )
    return waiter, clock, err


def test_captured_after_a_few_attempts_logs_state_changes_only(tmp_path: Path) -> None:
    probe = FakeProbe("IPv4", succeed_at=30)
    waiter, clock, err = make_waiter(tmp_path, {}, {4: probe}, timeout=60.0)
    assert waiter.run() == exitcodes.CAPTURED
    assert probe.attempts == 30 and probe.closed
    lines = err.getvalue().splitlines()
    assert sum("refused" in line for line in lines) == 1, lines
    assert clock.sleeps[0] <= 0.020 and max(clock.sleeps) <= 0.5


def test_timeout_message(tmp_path: Path) -> None:
    probe = FakeProbe("IPv4", succeed_at=None)
    waiter, clock, err = make_waiter(tmp_path, None, {4: probe}, timeout=30.0)
    assert waiter.run() == exitcodes.TIMEOUT
    assert clock.now - 100.0 == pytest.approx(30.0)
    text = err.getvalue()
    assert f"last probe ({waiter.attempts} attempts): IPv4: refused #{probe.attempts}" in text
    assert waiter.attempts == probe.attempts + 1  # and the IPv6 block, proven at once
    assert f"kubectl get pods --all-namespaces -l {CONTROLLER_SELECTOR} -o wide" in text
    assert "kubectl -n shop describe pod app-0" in text
    assert "is missing" in text
    assert 60 < probe.attempts < 150  # fast start, then 2 per second
    beats = [line for line in text.splitlines() if "still waiting" in line]
    assert len(beats) == 5, beats  # every 5 s of 30 s, the last one replaced by the timeout advice
    assert "still waiting (5s of 30s): for the capture rules to redirect the probe (IPv4 unproven" in beats[0]
    assert "last: IPv4: refused #" in beats[0] and "file " in beats[0]
    named, _, err2 = make_waiter(tmp_path, None, {4: FakeProbe("IPv4", None)}, timeout=1.0,
                                 controller_namespace="istio-system")  # fmt: skip
    assert named.run() == exitcodes.TIMEOUT
    assert f"kubectl get pods -n istio-system -l {CONTROLLER_SELECTOR} -o wide" in err2.getvalue()
    assert "kubectl logs -n istio-system <that controller pod>" in err2.getvalue()
    assert "istio-pod-network-controller get" not in err2.getvalue()


def _snapshot(**changes: object) -> Snapshot:
    base = Snapshot(
        waited=12.0, timeout=300.0, attempts=40, probes=("IPv4: dial 127.0.0.6:15002",),
        last=("IPv4: dial 127.0.0.6:15002: ECONNREFUSED",), pending=("IPv4",), plan_reason="",
        file="/etc/podinfo/pod_annotations", file_present=True, key=ann.STATUS, value="initialized",
        seen="initialized", annotation_decides=False, pod="web-1", pod_namespace="shop",
        controller_namespace="istio-system",
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_timeout_message_is_a_function_of_the_snapshot() -> None:
    text = timeout_message(_snapshot())
    assert text == timeout_message(_snapshot())
    assert "timed out after 300s" in text
    assert "last probe (40 attempts): IPv4: dial 127.0.0.6:15002: ECONNREFUSED" in text
    assert "'initialized' (wanted 'initialized'; present, but the probe shows no capture: forged" in text
    assert "kubectl get pods -n istio-system -l app.kubernetes.io/component=controller -o wide" in text
    assert "kubectl -n shop describe pod web-1" in text
    none = timeout_message(_snapshot(probes=(), last=(), pending=(), plan_reason="interceptionMode is NONE",
                                     annotation_decides=True, seen=None, file_present=False))  # fmt: skip
    assert "no probe applies: interceptionMode is NONE" in none
    assert "file /etc/podinfo/pod_annotations is missing (wanted 'initialized'; accepted as proof" in none


def test_heartbeat_says_what_it_waits_for_and_what_it_saw() -> None:
    line = heartbeat_line(_snapshot())
    assert line.startswith("still waiting (12s of 300s): for the capture rules to redirect the probe")
    assert "IPv4 unproven, 40 attempts" in line and "ECONNREFUSED" in line
    assert f"annotation {ann.STATUS}: 'initialized'" in line
    fallback = heartbeat_line(_snapshot(pending=(), plan_reason="interceptionMode is NONE", seen=None))
    assert f"for {ann.STATUS}='initialized' (interceptionMode is NONE)" in fallback
    assert "absent from /etc/podinfo/pod_annotations" in fallback


def test_forged_annotation_needs_trust(tmp_path: Path) -> None:
    forged = {ann.STATUS: ann.STATUS_INITIALIZED}
    waiter, _, err = make_waiter(tmp_path, forged, {4: FakeProbe("IPv4", None)}, timeout=5.0)
    assert waiter.run() == exitcodes.TIMEOUT
    assert "not trusted on its own" in err.getvalue()
    trusted, _, _ = make_waiter(tmp_path, forged, {4: FakeProbe("IPv4", None)}, trust_annotation=True)
    assert trusted.run() == exitcodes.CAPTURED


def test_no_probe_falls_back_or_refuses(tmp_path: Path) -> None:
    pod = {ann.INTERCEPTION_MODE: "NONE"}
    waiter, clock, err = make_waiter(tmp_path, pod, {}, timeout=5.0, delay=1.0)
    assert waiter.run() == exitcodes.TIMEOUT
    assert "no probe can prove capture" in err.getvalue()
    assert all(s >= 0.01 for s in clock.sleeps) and len(clock.sleeps) <= 12  # paced by --delay
    marked, _, _ = make_waiter(tmp_path, {**pod, ann.STATUS: "initialized"}, {})
    assert marked.run() == exitcodes.CAPTURED
    strict, _, _ = make_waiter(tmp_path, pod, {}, require_probe=True)
    with pytest.raises(Failure) as caught:
        strict.run()
    assert caught.value.code == exitcodes.PROBE_UNAVAILABLE


def test_a_capturing_spec_without_probe_refuses_the_annotation(tmp_path: Path) -> None:
    forged = {ann.ENVOY_USERID: "1338", ann.STATUS: "initialized"}
    waiter, _, _ = make_waiter(tmp_path, forged, {})
    with pytest.raises(Failure) as caught:
        waiter.run()
    assert caught.value.code == exitcodes.PROBE_UNAVAILABLE
    assert "the status annotation alone is not proof" in caught.value.message
    trusted, _, _ = make_waiter(tmp_path, forged, {}, trust_annotation=True)
    assert trusted.run() == exitcodes.CAPTURED


def test_both_families_must_be_proven(tmp_path: Path) -> None:
    v4, v6 = FakeProbe("IPv4", 1), FakeProbe("IPv6", 5)
    waiter, _, _ = make_waiter(tmp_path, {ann.IPV6: "capture"}, {4: v4, 6: v6})
    assert waiter.run() == exitcodes.CAPTURED
    assert (v4.attempts, v6.attempts) == (1, 5)


def test_an_open_ipv6_side_keeps_the_pod_closed(tmp_path: Path) -> None:
    """IPv4 captured, IPv6 not yet refused (the block rule missing): no exit 0 until it is."""
    v4, block = FakeProbe("IPv4", 1), FakeProbe("IPv6 block", 4)
    waiter, _, err = make_waiter(tmp_path, {}, {4: v4, BLOCK: block})
    assert waiter.run() == exitcodes.CAPTURED
    assert (v4.attempts, block.attempts) == (1, 4)
    never = FakeProbe("IPv6 block", None)
    waiter, _, err = make_waiter(tmp_path, {}, {4: FakeProbe("IPv4", 1), BLOCK: never}, timeout=2.0)
    assert waiter.run() == exitcodes.TIMEOUT
    assert "IPv6 block" in err.getvalue()


def test_plan_type() -> None:
    assert ProbePlan(()).reason == "" and ProbePlan(()).families == ()


# --- CLI ---------------------------------------------------------------------------------------------------


def test_help_lists_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["wait", "--help"])
    assert result.exit_code == 0
    assert " 124  capture not confirmed before --timeout" in result.output
    from istio_pod_network_controller.cli import wait as wait_cli

    def delay(command: click.Command) -> object:
        return next(p.default for p in command.params if p.name == "delay")

    assert (delay(wait_cli.init), delay(wait_cli.wait)) == (10.0, 2.0)


def test_bad_flags_are_usage_errors() -> None:
    assert CliRunner().invoke(cli, ["wait", "--timeout", "soon"]).exit_code == exitcodes.USAGE
    assert CliRunner().invoke(cli, ["init", "--bogus"]).exit_code == exitcodes.USAGE


def test_waiter_path_imports_stay_light(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from istio_pod_network_controller.cli import main\n"
        "try:\n"
        f"    main(['wait', '--file', {str(tmp_path / 'absent')!r}, '--timeout', '0'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('istio_pod_network_controller.rules', 'istio_pod_network_controller.dataplane',\n"
        "         'ipnc_lab.localapi', 'lightkube', 'aiohttp', 'prometheus_client',\n"
        "         'rich', 'yaml', 'asyncio', 'ctypes')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_tproxy_constants_match_the_rules() -> None:
    from istio_pod_network_controller.waiter import routing

    assert (routing.TPROXY_MARK, routing.TPROXY_ROUTE_TABLE) == (1337, 133)
    assert plan_probe(build_spec({ann.INTERCEPTION_MODE: "TPROXY"}), PROXY, PROXY, False).tproxy
    outbound_only = {ann.INTERCEPTION_MODE: "TPROXY", ann.INCLUDE_INBOUND_PORTS: ""}
    assert not plan_probe(build_spec(outbound_only), PROXY, PROXY, False).tproxy  # no TPROXY routes then
