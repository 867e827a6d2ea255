"""The waiter as a real init container: its own process in a real netns, uid 1337, no capabilities (root)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from waiter_helpers import StartWaiter, apply_rules, write_annotations

from istio_pod_network_controller.settings import annotations as ann
from istio_pod_network_controller.waiter import exitcodes
from proc_status import process_status

pytestmark = pytest.mark.root
ZERO_CAPS = "0000000000000000"
FORGED = {ann.STATUS: ann.STATUS_INITIALIZED}


def assert_unprivileged(pid: int) -> None:
    status = process_status(pid)
    assert status["Uid"].split() == ["1337"] * 4, status
    assert status["Gid"].split() == ["1337"] * 4, status
    assert status["Groups"] == "", status
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[key] == ZERO_CAPS, (key, status)
    assert status["NoNewPrivs"] == "1"


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def test_times_out_without_rules_unprivileged(
    netns_name: str, start_waiter: StartWaiter, workdir: Path
) -> None:
    waiter = start_waiter(netns_name, ["--file", str(workdir / "absent"), "--timeout", "1.5"])
    waiter.wait_for_log("probe IPv4: dial 127.0.0.6:15002")
    assert_unprivileged(waiter.pid)
    rc = waiter.finish()
    log = waiter.log()
    assert rc == exitcodes.TIMEOUT, log
    assert "ECONNREFUSED" in log
    assert "timed out after 1.5s" in log
    assert "kubectl get pods --all-namespaces -l app.kubernetes.io/component=controller -o wide" in log
    assert "selection rules" in log and "describe pod" in log
    assert "last probe" in log
    assert "is missing: using flag and built-in defaults" in log
    no_traceback(log)


@pytest.mark.parametrize(
    ("backend", "mode"),
    [("legacy", "REDIRECT"), ("nftables", "REDIRECT"), ("nft", "TPROXY"), ("legacy", "TPROXY")],
)
def test_exits_once_rules_are_applied(
    netns_name: str, start_waiter: StartWaiter, workdir: Path, backend: str, mode: str
) -> None:
    pod = {ann.INTERCEPTION_MODE: mode}
    path = write_annotations(workdir / "pod_annotations", pod)
    waiter = start_waiter(netns_name, ["--file", str(path), "--timeout", "10"])
    waiter.wait_for_log("ECONNREFUSED")
    time.sleep(0.2)
    assert waiter.proc.poll() is None, waiter.log()
    assert_unprivileged(waiter.pid)
    apply_rules(netns_name, pod, backend)
    applied = time.monotonic()
    rc = waiter.finish()
    took = time.monotonic() - applied
    log = waiter.log()
    assert rc == exitcodes.CAPTURED, log
    assert "redirected to 127.0.0.1:15006 (SO_ORIGINAL_DST 127.0.0.6:15002, token round trip ok)" in log
    assert "traffic capture confirmed" in log
    assert took < 1.0, (took, log)


def test_forged_annotation_is_not_enough(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    path = write_annotations(workdir / "pod_annotations", FORGED)
    waiter = start_waiter(netns_name, ["--file", str(path), "--timeout", "1", "--delay", "0.1"])
    rc = waiter.finish()
    log = waiter.log()
    assert rc == exitcodes.TIMEOUT, log
    assert "present but not trusted on its own" in log
    trusted = start_waiter(netns_name, ["--file", str(path), "--timeout", "5", "--trust-annotation"])
    rc = trusted.finish()
    assert rc == exitcodes.CAPTURED, trusted.log()
    assert "(--trust-annotation): done" in trusted.log()


def test_custom_port_from_2018_annotation(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    pod = {ann.ENVOY_PORT: "15100"}
    path = write_annotations(workdir / "pod_annotations", pod)
    waiter = start_waiter(netns_name, ["--file", str(path), "--timeout", "10"])
    waiter.wait_for_log("expect it at 127.0.0.1:15100")
    # Rules redirecting to the default port must not satisfy a waiter that expects 15100.
    apply_rules(netns_name, {}, "legacy")
    time.sleep(0.5)
    assert waiter.proc.poll() is None, waiter.log()
    apply_rules(netns_name, pod, "legacy")
    rc = waiter.finish()
    assert rc == exitcodes.CAPTURED, waiter.log()
    assert "redirected to 127.0.0.1:15100" in waiter.log()


def test_custom_ports_from_flags_and_env(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    defaults = {"inbound_port": "15200", "outbound_port": "15201"}
    apply_rules(netns_name, {}, "nftables", defaults)
    by_flag = start_waiter(
        netns_name,
        [
            "--file",
            str(workdir / "absent"),
            "--timeout",
            "5",
            "--inbound-port",
            "15200",
            "--outbound-port",
            "15201",
        ],
    )
    assert by_flag.finish() == exitcodes.CAPTURED, by_flag.log()
    assert "redirected to 127.0.0.1:15200" in by_flag.log()
    by_env = start_waiter(
        netns_name, ["--file", str(workdir / "absent"), "--timeout", "5"], env={"IPNC_INBOUND_PORT": "15200"}
    )
    assert by_env.finish() == exitcodes.CAPTURED, by_env.log()
    assert "redirected to 127.0.0.1:15200" in by_env.log()


def _ipv6_only(ns: str) -> None:
    """A veth pair inside the netns holds the pod's only non-loopback address: a global IPv6 one."""

    def ip(*argv: str) -> None:
        subprocess.run(["ip", "-n", ns, *argv], check=True, capture_output=True)

    ip("link", "add", "a0", "type", "veth", "peer", "name", "a1")
    ip("link", "set", "a0", "up")
    ip("link", "set", "a1", "up")
    ip("-6", "addr", "add", "2001:db8:1::2/64", "dev", "a0", "nodad")


@pytest.mark.parametrize("policy", ["capture", "auto"])
def test_ipv6_only_pod(netns_name: str, start_waiter: StartWaiter, workdir: Path, policy: str) -> None:
    _ipv6_only(netns_name)
    pod = {ann.IPV6: policy}
    path = write_annotations(workdir / "pod_annotations", pod)
    waiter = start_waiter(netns_name, ["--file", str(path), "--timeout", "10"])
    waiter.wait_for_log("probe: IPv6: dial [::6]:15002 from ::1")
    waiter.wait_for_log("::6 is not on lo yet")
    # IPv4 capture alone (IPv6 blocked, no ::6) proves nothing about IPv6: keep waiting.
    apply_rules(netns_name, {ann.IPV6: "block"}, "legacy")
    waiter.wait_for_log("IPv4: 127.0.0.1 -> 127.0.0.6:15002 was redirected")
    time.sleep(0.4)
    assert waiter.proc.poll() is None, waiter.log()
    apply_rules(netns_name, pod, "legacy")
    rc = waiter.finish()
    log = waiter.log()
    assert rc == exitcodes.CAPTURED, log
    assert "IPv6: ::1 -> [::6]:15002 was redirected to [::1]:15006 (SO_ORIGINAL_DST [::6]:15002" in log


def test_inbound_only_capture_is_probed(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    pod = {ann.INCLUDE_OUTBOUND_IP_RANGES: ""}
    path = write_annotations(workdir / "pod_annotations", pod)
    waiter = start_waiter(netns_name, ["--file", str(path), "--timeout", "10"])
    waiter.wait_for_log("ECONNREFUSED")
    apply_rules(netns_name, pod, "nftables")
    assert waiter.finish() == exitcodes.CAPTURED, waiter.log()


def _outbound_link(ns: str) -> None:
    """A veth pair inside the netns with a route to TEST-NET-1, so the outbound path has a route to dial.

    Nothing answers ARP for 192.0.2.1 there: an uncaptured dial never even sends its SYN."""

    def ip(*argv: str) -> None:
        subprocess.run(["ip", "-n", ns, *argv], check=True, capture_output=True)

    ip("link", "add", "b0", "type", "veth", "peer", "name", "b1")
    ip("link", "set", "b0", "up")
    ip("link", "set", "b1", "up")
    ip("addr", "add", "10.199.0.2/24", "dev", "b0")
    ip("route", "add", "192.0.2.0/24", "dev", "b0")


def _forged_stays_blocked_then_rules_open(
    ns: str, start_waiter: StartWaiter, workdir: Path, pod: dict[str, str], expect: str, **ids: int
) -> None:
    path = write_annotations(workdir / "pod_annotations", {**pod, **FORGED})
    forged = start_waiter(ns, ["--file", str(path), "--timeout", "1.5", "--delay", "0.1"], **ids)
    assert forged.finish() == exitcodes.TIMEOUT, forged.log()
    assert "present but not trusted on its own" in forged.log()
    assert "forged, or the rules were removed since" in forged.log()
    waiter = start_waiter(ns, ["--file", str(path), "--timeout", "10"], **ids)
    waiter.wait_for_log("probe: IPv4: dial")
    time.sleep(0.3)
    assert waiter.proc.poll() is None, waiter.log()
    apply_rules(ns, pod, "legacy")
    assert waiter.finish() == exitcodes.CAPTURED, waiter.log()
    assert expect in waiter.log()
    no_traceback(waiter.log())


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_outbound_only_forged_annotation_is_not_enough(
    netns_name: str, start_waiter: StartWaiter, workdir: Path, mode: str
) -> None:
    """Outbound-only: the proxy uid's loopback rule (Istio keeps it in that mode) is probed."""
    pod = {ann.INCLUDE_INBOUND_PORTS: "", ann.INTERCEPTION_MODE: mode}
    _forged_stays_blocked_then_rules_open(
        netns_name, start_waiter, workdir, pod,
        "127.0.0.1 -> 127.0.0.6:15002 was redirected to 127.0.0.1:15006 (SO_ORIGINAL_DST 127.0.0.6:15002",
    )  # fmt: skip


def test_other_proxy_uid_and_gid_probe_the_outbound_path(
    netns_name: str, start_waiter: StartWaiter, workdir: Path
) -> None:
    """envoy-userid/groupid 1338 while the waiter runs as 1337:1337: its own connection is app traffic."""
    _outbound_link(netns_name)
    pod = {ann.ENVOY_USERID: "1338", ann.ENVOY_GROUPID: "1338"}
    _forged_stays_blocked_then_rules_open(
        netns_name, start_waiter, workdir, pod,
        "this pod -> 192.0.2.1:15002 was redirected to 127.0.0.1:15001 (SO_ORIGINAL_DST 192.0.2.1:15002",
    )  # fmt: skip


def test_other_proxy_uid_with_the_proxy_gid_is_refused(
    netns_name: str, start_waiter: StartWaiter, workdir: Path
) -> None:
    """envoy-userid 1338 alone (gid stays 1337): no rule captures the waiter's connections, so nothing can
    prove capture and a forged annotation must not open the pod, rules or not."""
    pod = {ann.ENVOY_USERID: "1338"}
    path = write_annotations(workdir / "pod_annotations", {**pod, **FORGED})
    for with_rules in (False, True):
        if with_rules:
            apply_rules(netns_name, pod, "legacy")
        waiter = start_waiter(netns_name, ["--file", str(path), "--timeout", "5"])
        assert waiter.finish() == exitcodes.PROBE_UNAVAILABLE, waiter.log()
        assert "not the proxy uid 1338, but with the proxy gid 1337" in waiter.log()
        assert "the status annotation alone is not proof" in waiter.log()
        no_traceback(waiter.log())
    trusted = start_waiter(netns_name, ["--file", str(path), "--timeout", "5", "--trust-annotation"])
    assert trusted.finish() == exitcodes.CAPTURED, trusted.log()


def test_interception_none_accepts_the_annotation(
    netns_name: str, start_waiter: StartWaiter, workdir: Path
) -> None:
    pod = {ann.INTERCEPTION_MODE: "NONE"}
    path = write_annotations(workdir / "pod_annotations", pod)
    strict = start_waiter(netns_name, ["--file", str(path), "--timeout", "1", "--require-probe"])
    assert strict.finish() == exitcodes.PROBE_UNAVAILABLE, strict.log()
    # The controller marks the pod; the kubelet refreshes the file while the waiter runs.
    late = start_waiter(netns_name, ["--file", str(path), "--timeout", "10", "--delay", "0.2"])
    late.wait_for_log("falling back")
    write_annotations(path, {**pod, **FORGED})
    assert late.finish() == exitcodes.CAPTURED, late.log()
    assert "(no probe applies): done" in late.log()


def test_non_proxy_uid_says_why(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    apply_rules(netns_name, {}, "legacy")
    waiter = start_waiter(netns_name, ["--file", str(workdir / "absent"), "--timeout", "0.5"], uid=1000)
    assert waiter.finish() == exitcodes.PROBE_UNAVAILABLE, waiter.log()
    assert "runs as uid 1000, not the proxy uid 1337, but with the proxy gid 1337" in waiter.log()


def test_heartbeat_while_waiting(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    waiter = start_waiter(
        netns_name,
        ["--file", str(workdir / "absent"), "--timeout", "10", "--heartbeat", "0.5",
         "--controller-namespace", "istio-system"],
    )  # fmt: skip
    waiter.wait_for_log("still waiting (")
    waiter.wait_for_log("for the capture rules to redirect the probe (IPv4 unproven")
    assert "ECONNREFUSED" in waiter.log().split("still waiting", 1)[1]
    apply_rules(netns_name, {}, "legacy")
    assert waiter.finish() == exitcodes.CAPTURED, waiter.log()


def test_capture_port_in_use_is_reported(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    apply_rules(netns_name, {}, "legacy")
    holder = subprocess.Popen(
        ["ip", "netns", "exec", netns_name, "/usr/bin/python3", "-c",
         "import socket,time;s=socket.socket();s.bind(('127.0.0.1',15006));s.listen();print('ok',flush=True);"
         "time.sleep(30)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ok"
        waiter = start_waiter(netns_name, ["--file", str(workdir / "absent"), "--timeout", "0.8"])
        assert waiter.finish() == exitcodes.TIMEOUT, waiter.log()
        assert "cannot listen on 127.0.0.1:15006: EADDRINUSE" in waiter.log()
    finally:
        holder.kill()
        holder.wait()


def test_bad_file_and_bad_annotation(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    garbage = workdir / "garbage"
    garbage.write_bytes(b"this is not an annotations file\n")
    garbage.chmod(0o644)
    waiter = start_waiter(netns_name, ["--file", str(garbage), "--timeout", "5"])
    assert waiter.finish() == exitcodes.BAD_FILE, waiter.log()
    assert "expected key=" in waiter.log()
    no_traceback(waiter.log())

    secret = workdir / "secret"
    secret.write_text(f'{ann.STATUS}="initialized"\n')
    secret.chmod(0o600)
    waiter = start_waiter(netns_name, ["--file", str(secret), "--timeout", "5"])
    assert waiter.finish() == exitcodes.BAD_FILE, waiter.log()
    assert "Permission denied" in waiter.log()
    no_traceback(waiter.log())

    bad = write_annotations(workdir / "bad", {ann.INTERCEPTION_MODE: "SIDEWAYS"})
    waiter = start_waiter(netns_name, ["--file", str(bad), "--timeout", "5"])
    assert waiter.finish() == exitcodes.BAD_ANNOTATION, waiter.log()
    assert f"annotation {ann.INTERCEPTION_MODE}: invalid value 'SIDEWAYS'" in waiter.log()
    no_traceback(waiter.log())

    flag = start_waiter(netns_name, ["--file", str(bad), "--inbound-port", "99999"])
    assert flag.finish() == exitcodes.USAGE, flag.log()
    assert "--inbound-port (or IPNC_INBOUND_PORT): invalid value '99999'" in flag.log()
    no_traceback(flag.log())


def test_init_accepts_2018_flags(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    path = write_annotations(workdir / "pod_annotations", {"example.com/state": "ready"})
    args = [
        "--file", str(path), "--annotation-key", "example.com/state", "--annotation-value", "ready",
        "--timeout", "1", "--delay", "10",
    ]  # fmt: skip
    waiter = start_waiter(netns_name, args, command="init")
    assert waiter.finish() == exitcodes.TIMEOUT, waiter.log()  # annotation alone: not trusted
    assert "example.com/state='ready' present but not trusted" in waiter.log()
    apply_rules(netns_name, {}, "legacy")
    waiter = start_waiter(netns_name, args, command="init")
    assert waiter.finish() == exitcodes.CAPTURED, waiter.log()
    trusted = start_waiter(netns_name, [*args, "--trust-annotation"], command="init")
    assert trusted.finish() == exitcodes.CAPTURED, trusted.log()
    unknown = start_waiter(netns_name, ["--no-such-flag"], command="init")
    assert unknown.finish() == exitcodes.USAGE
    no_traceback(unknown.log())


def test_probe_never_leaves_the_netns(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    """Without rules the IPv6 probe does not dial ::6 at all, and the IPv4 one stays on lo (127/8)."""
    _ipv6_only(netns_name)
    path = write_annotations(workdir / "pod_annotations", {ann.IPV6: "capture"})
    waiter = start_waiter(netns_name, ["--file", str(path), "--timeout", "0.6"])
    assert waiter.finish() == exitcodes.TIMEOUT
    stats = subprocess.run(
        ["ip", "-n", netns_name, "-s", "-j", "link", "show", "a0"], capture_output=True, text=True, check=True
    ).stdout
    tx = json.loads(stats)[0]["stats64"]["tx"]["packets"]
    # Router/neighbour solicitations may go out when a0 comes up; a probe would add TCP SYNs every attempt.
    assert tx < 10, stats


def test_tproxy_waits_for_policy_routing(netns_name: str, start_waiter: StartWaiter, workdir: Path) -> None:
    """The controller adds `fwmark 1337 lookup 133` and its local route after the packet rules."""
    pod = {ann.INTERCEPTION_MODE: "TPROXY"}
    apply_rules(netns_name, pod, "nftables")
    subprocess.run(["ip", "-n", netns_name, "rule", "del", "fwmark", "1337", "lookup", "133"], check=True)
    path = write_annotations(workdir / "pod_annotations", pod)
    waiter = start_waiter(netns_name, ["--file", str(path), "--timeout", "10"])
    waiter.wait_for_log("TPROXY's policy rule 'fwmark 1337 lookup 133' is missing")
    time.sleep(0.3)
    assert waiter.proc.poll() is None, waiter.log()
    subprocess.run(["ip", "-n", netns_name, "rule", "add", "fwmark", "1337", "lookup", "133"], check=True)
    assert waiter.finish() == exitcodes.CAPTURED, waiter.log()


def test_outbound_owner_groups_decide_the_outbound_probe(
    netns_name: str, start_waiter: StartWaiter, workdir: Path
) -> None:
    """A waiter that is not the proxy probes as app traffic: with its gid among the captured owner groups the
    outbound path proves capture; with its gid excluded no rule captures it, and it says so (exit 5)."""
    _outbound_link(netns_name)
    pod = {ann.ENVOY_USERID: "1338", ann.ENVOY_GROUPID: "1338"}
    path = write_annotations(workdir / "pod_annotations", pod)
    apply_rules(netns_name, pod, "legacy", {"outbound_owner_groups": "1337"})
    listed = start_waiter(
        netns_name, ["--file", str(path), "--timeout", "10", "--outbound-owner-groups", "1337"]
    )
    assert listed.finish() == exitcodes.CAPTURED, listed.log()
    assert "this pod -> 192.0.2.1:15002 was redirected to 127.0.0.1:15001" in listed.log()
    apply_rules(netns_name, pod, "legacy", {"outbound_owner_groups_exclude": "1337"})
    excluded = start_waiter(
        netns_name, ["--file", str(path), "--timeout", "5", "--outbound-owner-groups-exclude", "1337"]
    )
    assert excluded.finish() == exitcodes.PROBE_UNAVAILABLE, excluded.log()
    assert "the outbound owner groups leave gid 1337's traffic uncaptured" in excluded.log()
    no_traceback(excluded.log())
