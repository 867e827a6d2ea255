"""The mistakes a newcomer makes end as one line naming the fix, a distinct exit code and no traceback.

Real processes, as a user runs them: `run` with a missing, invalid or absent kubeconfig, an unreachable API
server, a /proc root that is not one; `rules` without the privileges it needs (as uid 1000 with Debian's
python, the way a non-root operator would run it); the 2018 flag and variable names.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ipnc_lab.localapi.resources import CORE_EVENTS, NODES
from ipnc_lab.localapi.server import ThreadedServer
from ipnc_lab.localapi.tls import generate_certificates
from ipnc_lab.sim.cluster import unique_name
from ipnc_lab.sim.controller import free_port, http_get, wait_for
from ipnc_lab.sim.runtime import SYSTEM_PYTHON, build_runtime, runtime_env
from istio_pod_network_controller.cli import exitcodes
from istio_pod_network_controller.controller.kubeconfig import KubeconfigError, Source, resolve
from istio_pod_network_controller.install import rbac

CLI = [sys.executable, "-m", "istio_pod_network_controller"]
NODE = ["--node-name", "node-1"]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No KUBECONFIG, no in-cluster variables, an empty home: as on a fresh workstation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "IPNC_"))}
    for name in ("LOG_LEVEL", "NODE_NAME", "ENVOY_PORT", "ENABLE_INBOUND_IPV6"):
        env.pop(name, None)
    return {**env, "HOME": str(home), **extra}


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def one_clear_line(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    line = done.stderr.strip()
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(line.splitlines()) == 1, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
            }
        )
    )
    return path


# --- kubeconfig: which one, and what is wrong with it ----------------------------------------------------


def test_resolve_order_is_flag_then_kubeconfig_env_then_in_cluster_then_home() -> None:
    files = {"/flag", "/env2", "/sa/token", "/home/u/.kube/config"}
    exists = files.__contains__
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert resolve("/flag", {"KUBECONFIG": "/env2"}, "/home/u", "/sa", exists) == Source("flag", "/flag")
    both = {**in_cluster, "KUBECONFIG": "/missing:/env2"}
    assert resolve(None, both, "/home/u", "/sa", exists) == Source("env", "/env2")
    assert resolve(None, in_cluster, "/home/u", "/sa", exists) == Source("in-cluster", None)
    assert resolve(None, {}, "/home/u", "/sa", exists) == Source("home", "/home/u/.kube/config")
    with pytest.raises(KubeconfigError, match="no cluster configuration"):
        resolve(None, {}, "/nobody", "/sa", exists)
    with pytest.raises(KubeconfigError, match="KUBECONFIG=/a:/b: no such file"):
        resolve(None, {"KUBECONFIG": "/a:/b"}, "/home/u", "/sa", exists)
    with pytest.raises(KubeconfigError, match="--kubeconfig /nope: no such file"):
        resolve("/nope", {}, "/home/u", "/sa", exists)


def test_run_with_a_missing_kubeconfig(tmp_path: Path) -> None:
    done = cli("run", *NODE, "--kubeconfig", "/nonexistent", env=clean_env(tmp_path))
    one_clear_line(done, exitcodes.CONFIG, "--kubeconfig /nonexistent: no such file")


def test_run_outside_a_cluster(tmp_path: Path) -> None:
    done = cli("run", *NODE, env=clean_env(tmp_path))
    one_clear_line(done, exitcodes.CONFIG, "not in a cluster", "give --kubeconfig PATH or set KUBECONFIG")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clusters: [\n", "not YAML (line 2)"),
        ("root:x:0:0:root:/root:/bin/bash\n", "not a YAML mapping"),
        ("apiVersion: v1\nkind: Config\n", "no current-context"),
        (
            "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\nclusters: []\n"
            "users: [{name: u, user: {}}]\n",
            "no entry named 'k' in 'clusters'",
        ),
        (
            "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
            "clusters: [{name: k, cluster: {server: 'localhost:6443'}}]\nusers: [{name: u, user: {}}]\n",
            "cluster 'k' has no http(s):// server address",
        ),
        (
            "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
            "clusters: [{name: k, cluster: {server: 'https://a:6443', certificate-authority: ca.crt}}]\n"
            "users: [{name: u, user: {}}]\n",
            "cluster certificate-authority ca.crt: no such file",
        ),
        (
            "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
            "clusters: [{name: k, cluster: {server: 'https://a:6443', certificate-authority: /etc/passwd}}]\n"
            "users: [{name: u, user: {}}]\n",
            "invalid cluster configuration: [X509",
        ),
    ],
)
def test_run_with_an_invalid_kubeconfig(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config"
    path.write_text(text)
    done = cli("run", *NODE, "--kubeconfig", str(path), env=clean_env(tmp_path))
    one_clear_line(done, exitcodes.CONFIG, str(path), message)


def test_kubeconfig_env_and_home_are_honoured_and_errors_name_them(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("[]\n")
    done = cli("run", *NODE, env=clean_env(tmp_path, KUBECONFIG=str(bad)))
    one_clear_line(done, exitcodes.CONFIG, f"KUBECONFIG={bad}: invalid kubeconfig")
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("[]\n")
    done = cli("run", *NODE, env=clean_env(tmp_path))
    one_clear_line(done, exitcodes.CONFIG, f"{tmp_path}/.kube/config: invalid kubeconfig")


# --- run: preflight keeps it unready, says why, puts it on the node ----------------------------------------


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; each is stopped by its PID afterwards."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def start_run(
    procs: list[subprocess.Popen[str]], log: Path, env: dict[str, str], *args: str
) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    argv = [*CLI, "run", *NODE, "--listen-address", f"127.0.0.1:{port}", "--log-format", "text", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    procs.append(proc)
    return proc, port


def test_unreachable_api_server_is_named_and_keeps_run_unready(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    server = f"https://127.0.0.1:{free_port()}"
    (tmp_path / ".kube").mkdir()
    kubeconfig(tmp_path / ".kube" / "config", server)
    log = tmp_path / "run.log"
    proc, port = start_run(started, log, clean_env(tmp_path), "--preflight-retry", "0.5")
    wait_for(lambda: "preflight failed" in http_get(port, "/readyz")[1], 30, "unready with a reason")
    status, body = http_get(port, "/readyz")
    assert status == 503
    assert f"cannot reach the API server {server}" in body
    assert http_get(port, "/healthz")[0] == 200  # alive: a liveness probe must not restart it for this
    proc.terminate()
    assert proc.wait(15) == 0
    text = log.read_text()
    assert f"API server {server} ({tmp_path}/.kube/config)" in text
    failures = [line for line in text.splitlines() if "preflight failed" in line]
    assert len(failures) == 1, text  # logged once, not once per retry
    assert f"cannot reach the API server {server}: " in failures[0]
    assert ": 0 " not in failures[0] and "Traceback" not in text


def test_run_with_a_proc_root_that_is_not_there_fails_preflight_with_an_event(
    tmp_path: Path, api: ThreadedServer, started: list[subprocess.Popen[str]]
) -> None:
    user = api.add_user("ipnc", "ipnc-token", rbac.cluster_role_rules())
    config = api.api.write_kubeconfig(tmp_path / "kubeconfig", user)
    log = tmp_path / "run.log"
    env = clean_env(tmp_path)
    _, port = start_run(started, log, env, "--kubeconfig", str(config), "--proc-root", "/nonexistent")
    wait_for(lambda: "preflight failed" in http_get(port, "/readyz")[1], 30, f"unready\n{log.read_text()}")
    fix = "/proc root /nonexistent: no such directory; fix: mount the node's /proc"
    assert fix in http_get(port, "/readyz")[1]

    def node_events() -> list[dict[str, object]]:
        return [
            e
            for e in api.store.objects(CORE_EVENTS, "default")
            if e["involvedObject"].get("kind") == "Node" and e["involvedObject"].get("name") == "node-1"
        ]

    wait_for(lambda: bool(node_events()), 15, "a Warning Event on the node")
    event = node_events()[0]
    assert event["type"] == "Warning" and event["reason"] == "PreflightFailed"
    assert "/proc root /nonexistent" in str(event["message"])
    assert "Traceback" not in log.read_text()
    assert not any(r.resource == "pods" for r in api.requests.records() if r.user == "ipnc")  # no pod work


# --- 2018 names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"ENVOY_PORT": "abc"}, [], "ENVOY_PORT: invalid value 'abc'"),
        (
            {"ISTIO_INCLUDE_OUTBOUND_IP_RANGES": "not-a-cidr"},
            [],
            "--istio-include-outbound-ip-ranges: invalid value 'not-a-cidr'",
        ),
        ({"ENABLE_INBOUND_IPV6": "maybe"}, [], "--enable-inbound-ipv6: invalid value 'maybe'"),
        ({}, ["--enable-inbound-ipv6", "yes"], "--enable-inbound-ipv6: invalid value 'yes'"),
        ({"LOG_LEVEL": "loud"}, [], "'loud' is not one of"),
    ],
)
def test_2018_variables_and_flags_are_read(
    tmp_path: Path, env: dict[str, str], args: list[str], message: str
) -> None:
    done = cli("run", *NODE, *args, env=clean_env(tmp_path, **env))
    one_clear_line(done, exitcodes.USAGE, message, "(see 'istio-pod-network-controller run --help')")


def test_usage_errors_are_one_line_too(tmp_path: Path) -> None:
    one_clear_line(
        cli("run", env=clean_env(tmp_path)), exitcodes.USAGE, "--node-name (or NODE_NAME) is required"
    )
    one_clear_line(cli("rules", "aply"), exitcodes.USAGE, "No such command 'aply'")
    one_clear_line(cli("run", "--backend", "iptables"), exitcodes.USAGE, "'iptables' is not one of")


def test_2018_log_level_before_the_subcommand_and_from_log_level(tmp_path: Path) -> None:
    config = kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{free_port()}")
    # `run` keeps running on a failed preflight; check the level by what it logs in its first second.
    for env, args, expect_info in (
        ({"LOG_LEVEL": "warn"}, [], False),
        ({}, ["--log-level", "error"], False),
        ({}, [], True),
    ):
        log = tmp_path / "log"
        argv = [*CLI, *args, "run", *NODE, "--kubeconfig", str(config), "--log-format", "text",
                "--listen-address", f"127.0.0.1:{free_port()}"]  # fmt: skip
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=clean_env(tmp_path, **env)
            )
        try:
            wait_for(lambda: "preflight failed" in (tmp_path / "log").read_text(), 30, "the preflight line")
        finally:
            proc.terminate()
            proc.wait(15)
        assert ("INFO" in log.read_text()) is expect_info, (env, args, log.read_text())


def test_init_takes_log_level_after_and_before_the_subcommand(tmp_path: Path) -> None:
    args = ["--file", str(tmp_path / "none"), "--timeout", "0"]
    for argv in (["init", "--log-level", "debug", *args], ["--log-level", "debug", "init", *args]):
        done = cli(*argv)
        assert "debug: spec" in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr
    assert "debug: spec" not in cli("init", "--log-level", "info", *args).stderr


# --- rules: the node's /proc and privileges -----------------------------------------------------------------


def test_find_netns_with_a_proc_root_that_is_not_there() -> None:
    done = cli("rules", "find-netns", "--pod-uid", "x", "--proc-root", "/nonexistent")
    one_clear_line(done, exitcodes.NOT_FOUND, "--proc-root /nonexistent: no such directory")


def test_verify_of_a_pod_refuses_to_compare_with_defaults() -> None:
    done = cli("rules", "verify", "--pid", "1")
    assert done.returncode == exitcodes.USAGE
    assert "--pod NS/NAME" in done.stderr and "--annotations FILE" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def runtime() -> Iterator[Path]:
    base = build_runtime()
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_user(runtime: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as uid/gid 1000 with Debian's python and a world-readable copy of the product."""
    return subprocess.run(
        [SYSTEM_PYTHON, "-m", "istio_pod_network_controller", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env=runtime_env(runtime), user=1000, group=1000, extra_groups=[],
    )  # fmt: skip


@pytest.mark.root
def test_without_privileges_apply_says_permission_and_names_capabilities(
    runtime: Path, netns_name: str
) -> None:
    done = as_user(runtime, "rules", "apply", "--netns", f"/run/netns/{netns_name}")
    line = one_clear_line(
        done, exitcodes.PERMISSION, "permission denied (EPERM)", "CAP_SYS_ADMIN", "CAP_NET_ADMIN"
    )
    assert "not a network namespace" not in line
    done = as_user(runtime, "rules", "apply", "--pid", "1")
    one_clear_line(done, exitcodes.PERMISSION, "CAP_SYS_PTRACE", "CAP_NET_ADMIN")
    done = as_user(runtime, "rules", "verify", "--pid", "1", "--flags-only")
    one_clear_line(done, exitcodes.PERMISSION, "CAP_SYS_PTRACE")
    done = as_user(runtime, "rules", "find-netns", "--pod-uid", "0e0e0e0e-0000-4000-8000-000000000000")
    one_clear_line(done, exitcodes.NOT_FOUND, "without CAP_SYS_PTRACE")


@pytest.mark.root
def test_verify_of_a_namespace_without_rules_says_not_installed(netns_name: str) -> None:
    target = ["--netns", f"/run/netns/{netns_name}", "--backend", "legacy"]
    done = cli("rules", "verify", *target, "--flags-only")
    assert done.returncode == exitcodes.NOT_INSTALLED, done.stdout + done.stderr
    assert (
        done.stdout.strip()
        == f"/run/netns/{netns_name}: not installed: no rules of ours in this network namespace"
    )


# --- named flags and files; user errors that are not the data plane's ----------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port this test holds open, so a command told to listen there finds it in use."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def last_line(done: subprocess.CompletedProcess[str], code: int, expected: str) -> None:
    """The command's verdict is its last stderr line (log lines may precede it); never a traceback."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == expected


def test_run_names_a_taken_listen_address(tmp_path: Path, taken_port: int) -> None:
    config = kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{free_port()}")
    address = f"127.0.0.1:{taken_port}"
    done = cli(
        "run", *NODE, "--kubeconfig", str(config), "--listen-address", address, env=clean_env(tmp_path)
    )
    last_line(done, exitcodes.USAGE, f"error: --listen-address {address}: Address already in use")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pems = generate_certificates()
    directory = tmp_path_factory.mktemp("certs")
    (directory / "tls.crt").write_bytes(pems.cert_pem)
    (directory / "tls.key").write_bytes(pems.key_pem)
    return directory / "tls.crt", directory / "tls.key"


def test_webhook_names_its_missing_certificate(tmp_path: Path) -> None:
    missing = tmp_path / "tls.crt"
    done = cli("webhook", "--tls-cert-file", str(missing), "--listen-address", "127.0.0.1:0")
    one_clear_line(
        done, exitcodes.NOT_FOUND, f"error: --tls-cert-file {missing}: No such file or directory (mount"
    )


def test_webhook_names_a_bad_pem(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    bad = tmp_path / "tls.crt"
    bad.write_text("not a certificate\n")
    args = [
        "--tls-cert-file",
        str(bad),
        "--tls-key-file",
        str(certificate[1]),
        "--listen-address",
        "127.0.0.1:0",
    ]
    line = one_clear_line(cli("webhook", *args), exitcodes.USAGE, f"--tls-cert-file {bad} / --tls-key-file")
    assert line.endswith("not a PEM certificate chain and its matching private key"), line
    assert "_ssl.c" not in line


def test_webhook_names_a_taken_listen_address(certificate: tuple[Path, Path], taken_port: int) -> None:
    cert, key = certificate
    address = f"127.0.0.1:{taken_port}"
    done = cli(
        "webhook", "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--listen-address", address
    )
    last_line(done, exitcodes.USAGE, f"error: --listen-address {address}: Address already in use")


def test_find_netns_refuses_an_address_that_is_not_one() -> None:
    done = cli("rules", "find-netns", "--pod-uid", "x", "--pod-ip", "300.1.1.1")
    one_clear_line(done, exitcodes.USAGE, "error: --pod-ip '300.1.1.1': not an IP address")


@pytest.mark.root
def test_a_netns_path_that_is_not_one_is_a_usage_error() -> None:
    for command in ("apply", "verify", "clean"):
        flags = ["--flags-only"] if command == "verify" else []
        done = cli("rules", command, "--netns", "/tmp", *flags)
        one_clear_line(
            done,
            exitcodes.USAGE,
            "error: --netns /tmp: not a network namespace (give /run/netns/NAME or /proc/PID/ns/net)",
        )


@pytest.mark.root
def test_clean_of_a_namespace_without_our_rules_says_so(netns_name: str) -> None:
    path = f"/run/netns/{netns_name}"
    for backend in ("auto", "legacy", "nftables"):
        done = cli("rules", "clean", "--netns", path, "--backend", backend)
        assert done.returncode == exitcodes.OK, done.stderr
        expected = f"{path}: nothing to clean: no rules or routes of ours in this network namespace"
        assert done.stdout.strip() == expected
    assert cli("rules", "apply", "--netns", path, "--backend", "legacy").returncode == exitcodes.OK
    done = cli("rules", "clean", "--netns", path)
    assert done.stdout.strip() == f"cleaned {path}: removed ours from legacy", done.stdout + done.stderr


@pytest.mark.root
def test_run_for_a_node_that_does_not_exist_warns(
    tmp_path: Path, api: ThreadedServer, started: list[subprocess.Popen[str]]
) -> None:
    user = api.add_user("ipnc-nodes", "ipnc-nodes-token", rbac.cluster_role_rules())
    config = api.api.write_kubeconfig(tmp_path / "kubeconfig", user)
    real = unique_name("node")
    api.store.create(NODES, None, {"metadata": {"name": real}})
    ports = {}
    for node in (real, unique_name("no-such-node")):
        log = tmp_path / f"{node}.log"
        argv = [*CLI, "run", "--node-name", node, "--kubeconfig", str(config), "--log-format", "text"]
        ports[node] = free_port()
        argv += ["--listen-address", f"127.0.0.1:{ports[node]}"]
        with log.open("w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=clean_env(tmp_path))
        started.append(proc)
    for node, port in ports.items():
        wait_for(lambda port=port: http_get(port, "/readyz")[0] == 200, 30, f"{node} ready")
    missing = next(node for node in ports if node != real)
    warning = (
        f"warning: no Node named {missing!r} in the cluster; this controller will find no pods: "
        "check --node-name / NODE_NAME (the DaemonSet sets it from spec.nodeName)"
    )
    assert http_get(ports[missing], "/readyz")[1].strip() == f"ok; {warning}"
    assert warning in (tmp_path / f"{missing}.log").read_text()
    assert http_get(ports[real], "/readyz")[1].strip() == "ok"
    assert "no Node named" not in (tmp_path / f"{real}.log").read_text()
