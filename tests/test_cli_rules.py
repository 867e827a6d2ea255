"""`istio-pod-network-controller rules …` as a user runs it: a real process, exit codes, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipnc_lab.sim.controller import wait_for
from istio_pod_network_controller.cli import exitcodes

CLI = [sys.executable, "-m", "istio_pod_network_controller", "rules"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def test_render_prints_istio_rules_and_routes() -> None:
    done = cli("render", "--interception-mode", "TPROXY", "--exclude-outbound-ports", "5432")
    assert done.returncode == 0, done.stderr
    assert "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006" in done.stdout
    assert "-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN" in done.stdout
    assert "# ip -4 rule add fwmark 1337 lookup 133" in done.stdout


def test_render_nftables_and_annotations_file(tmp_path: Path) -> None:
    annotations = tmp_path / "pod_annotations"
    annotations.write_text('pod-network-controller.istio.io/envoy-port="15100"\n')
    done = cli("render", "--format", "nftables", "--annotations", str(annotations), "--envoy-port", "15001")
    assert done.returncode == 0, done.stderr
    assert "redirect to :15100" in done.stdout and "redirect to :15001" not in done.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["render", "--include-inbound-ports", "80,abc"],
            exitcodes.USAGE,
            "--include-inbound-ports (or IPNC_INCLUDE_INBOUND_PORTS): invalid value '80,abc'",
        ),
        (
            ["render", "--interception-mode", "MAGIC"],
            exitcodes.USAGE,
            "--interception-mode (or IPNC_INTERCEPTION_MODE): invalid value 'MAGIC'",
        ),
        (
            ["render", "--annotations", "/nonexistent/file"],
            exitcodes.USAGE,
            "/nonexistent/file: No such file",
        ),
        (["apply"], exitcodes.USAGE, "give exactly one of --netns PATH or --pid PID"),
    ],
)
def test_errors_are_one_clear_line_without_traceback(args: list[str], code: int, message: str) -> None:
    done = cli(*args)
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.root
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["apply", "--netns", "/nonexistent"], "cannot open network namespace /nonexistent"),
        (
            [
                "find-netns",
                "--pod-uid",
                "0e0e0e0e-0000-4000-8000-000000000000",
                "--pod-ip",
                "10.9.0.9",
                "--host-ip",
                "10.9.0.254",
            ],
            "no process in a cgroup of this pod",
        ),
    ],
)
def test_missing_targets_are_not_found(args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode == exitcodes.NOT_FOUND, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_annotation_error_names_annotation_and_value(tmp_path: Path) -> None:
    annotations = tmp_path / "pod_annotations"
    annotations.write_text('traffic.sidecar.istio.io/excludeOutboundIPRanges="10.0.0.0/8,not-a-cidr"\n')
    done = cli("render", "--annotations", str(annotations))
    assert done.returncode == 2
    assert (
        "annotation traffic.sidecar.istio.io/excludeOutboundIPRanges: invalid value '10.0.0.0/8,not-a-cidr'"
        in done.stderr
    )


@pytest.mark.root
def test_apply_verify_clean_round_trip(netns_name: str) -> None:
    target = ["--netns", f"/run/netns/{netns_name}", "--backend", "legacy"]
    applied = cli("apply", *target, "--capture-dns", "true")
    assert applied.returncode == 0, applied.stderr
    assert "with legacy" in applied.stdout
    assert cli("verify", *target, "--flags-only", "--capture-dns", "true").returncode == exitcodes.OK
    drifted = cli("verify", *target, "--flags-only")
    assert drifted.returncode == exitcodes.DRIFT
    assert "chain ISTIO_OUTPUT_DNS should not exist" in drifted.stdout
    cleaned = cli("clean", *target)
    assert cleaned.returncode == 0, cleaned.stderr
    saved = legacy_save(netns_name)
    assert "ISTIO" not in saved


@pytest.mark.root
def test_verify_reports_a_foreign_bypass_and_is_not_in_place(netns_name: str) -> None:
    """Every rule of ours intact, a tenant's nat chain at priority -150 before them: exit 1, says where."""
    target = ["--netns", f"/run/netns/{netns_name}", "--backend", "nftables"]
    assert cli("apply", *target).returncode == 0
    assert cli("verify", *target, "--flags-only").returncode == exitcodes.OK
    script = (
        "table ip tenant {\n  chain out {\n    type nat hook output priority -150; policy accept;\n"
        "    tcp dport 9090 dnat to 10.0.0.2:9090\n  }\n}\n"
    )
    subprocess.run(["ip", "netns", "exec", netns_name, "nft", "-f", "-"], input=script, text=True, check=True)
    reported = cli("verify", *target, "--flags-only")
    assert reported.returncode == exitcodes.DRIFT, reported.stdout
    assert "bypass: nft ip nat chain at output priority -150" in reported.stdout
    assert "(table tenant chain out)" in reported.stdout


@pytest.mark.root
def test_host_netns_refused_by_pid() -> None:
    done = cli("apply", "--pid", str(os.getpid()), "--backend", "legacy")
    assert done.returncode == exitcodes.USAGE
    assert "is the host's network namespace" in done.stderr


@pytest.mark.root
def test_a_pids_namespace_is_refused_where_pid_1_cannot_be_read(netns_name: str, tmp_path: Path) -> None:
    """A proc root whose PID 1 is unreadable (EACCES on real nodes): --pid cannot be told apart from the
    node's namespace, so it is refused (one line) unless --allow-host-netns; a named netns file is not."""
    proc = tmp_path / "proc" / "4242"
    (proc / "ns").mkdir(parents=True)
    (proc / "cgroup").write_text("0::/\n")
    (proc / "ns" / "net").symlink_to(f"/run/netns/{netns_name}")
    root = ["--proc-root", str(tmp_path / "proc"), "--backend", "legacy"]
    done = cli("apply", "--pid", "4242", *root)
    assert done.returncode == exitcodes.USAGE, done.stderr
    assert "cannot be told apart from the node's own network namespace" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert cli("clean", "--pid", "4242", *root, "--allow-host-netns").returncode == 0
    assert cli("clean", "--netns", f"/run/netns/{netns_name}", *root).returncode == 0


@pytest.mark.root
def test_find_netns_with_a_proc_root(netns_name: str, tmp_path: Path) -> None:
    uid = "5c1e5a9e-1111-4222-8333-944455556666"
    proc = tmp_path / "proc" / "4242"
    (proc / "ns").mkdir(parents=True)
    slice_name = f"kubepods-pod{uid.replace('-', '_')}.slice"
    (proc / "cgroup").write_text(f"0::/kubepods.slice/{slice_name}/cri-containerd-{'ab' * 32}.scope\n")
    (proc / "ns" / "net").symlink_to(f"/run/netns/{netns_name}")
    (proc / "net").mkdir()
    (proc / "net" / "fib_trie").write_text("Local:\n  |-- 10.9.0.9\n     /32 host LOCAL\n")
    args = ["--pod-ip", "10.9.0.9", "--host-ip", "10.9.0.254", "--proc-root", str(tmp_path / "proc")]
    done = cli("find-netns", "--pod-uid", uid, *args)
    assert done.returncode == 0, done.stderr
    inode = os.stat(f"/run/netns/{netns_name}").st_ino
    assert f"pod {uid}: net:[{inode}] via pid 4242 (container {'ab' * 32}" in done.stdout


@pytest.mark.root
def test_apply_by_pid_narrows_dns_capture_to_that_process_nameservers(netns_name: str) -> None:
    """`ip netns exec` shows the process /etc/netns/NAME/resolv.conf as its /etc/resolv.conf: --pid reads it
    (through the process's root, as the controller reads a pod's) and captures DNS to that server only."""
    etc = Path("/etc/netns") / netns_name
    etc.mkdir(parents=True)
    sleeper = None
    try:
        (etc / "resolv.conf").write_text("nameserver 192.0.2.53\n")
        sleeper = subprocess.Popen(["ip", "netns", "exec", netns_name, "sleep", "120"])
        wait_for_netns(sleeper.pid, netns_name)
        # --allow-host-netns: PID 1's namespace cannot be read here, so a bare --pid is refused (fail closed)
        target = [
            "--pid",
            str(sleeper.pid),
            "--allow-host-netns",
            "--backend",
            "legacy",
            "--capture-dns",
            "true",
        ]
        applied = cli("apply", *target)
        assert applied.returncode == 0, applied.stderr
        saved = legacy_save(netns_name)
        dns = [line for line in saved.splitlines() if "--dport 53" in line and "REDIRECT" in line]
        assert dns and all("-d 192.0.2.53/32" in line for line in dns), saved
        assert cli("verify", *target, "--flags-only").returncode == exitcodes.OK
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        (etc / "resolv.conf").unlink(missing_ok=True)
        etc.rmdir()


def legacy_save(netns_name: str) -> str:
    """iptables-legacy-save inside the test's namespace."""
    command = ["ip", "netns", "exec", netns_name, "iptables-legacy-save"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def wait_for_netns(pid: int, name: str) -> None:
    """Until the process has entered the named namespace (ip netns exec switches, then execs sleep)."""
    want = os.stat(f"/run/netns/{name}").st_ino

    def entered() -> bool:
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            return os.stat(f"/proc/{pid}/ns/net").st_ino == want and exe.endswith("sleep")
        except OSError:
            return False

    wait_for(entered, 10, f"pid {pid} in {name}")
