"""The real controller (`istio-pod-network-controller run`) as a subprocess: start, probe, signal, measure.

Used by the demo, the end-to-end and soak tests and the benchmarks. Only the process started here is ever
signalled, by its own PID.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `check` until it is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET a controller's status path on loopback: (HTTP status, body), or (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


class ControllerProcess:
    """One `run` subprocess for one node; its output goes to `log_path`."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    @classmethod
    def start(
        cls,
        kubeconfig: Path,
        node_name: str,
        log_path: Path,
        extra: Sequence[str] = (),
        *,
        port: int | None = None,
    ) -> ControllerProcess:
        """Start the controller for `node_name` with text logs, status on 127.0.0.1:port (free if None)."""
        port = port or free_port()
        argv = [
            sys.executable, "-m", "istio_pod_network_controller", "run",
            "--kubeconfig", str(kubeconfig), "--node-name", node_name,
            "--listen-address", f"127.0.0.1:{port}", "--log-format", "text", *extra,
        ]  # fmt: skip
        with log_path.open("ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return cls(proc, port, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def http(self, path: str) -> tuple[int, str]:
        """GET a status path: (HTTP status, body), or (0, error) when nothing answers."""
        return http_get(self.port, path)

    def wait_ready(self, timeout: float = 20) -> None:
        """Until /readyz is 200 (initial sync done); fails early with the log if the process exited."""

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"controller exited ({self.proc.returncode})\n{self.log()}")
            return self.http("/readyz")[0] == 200

        wait_for(ready, timeout, f"controller ready\n{self.log()}")

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of the samples of `name` whose label set contains the text `labels` (e.g. 'code="429"')."""
        _, text = self.http("/metrics")
        pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
        return sum(
            float(match.group(2)) for match in pattern.finditer(text) if labels in (match.group(1) or "")
        )

    def rss_mib(self) -> float:
        """VmRSS of the process in MiB (NaN once it is gone)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return float("nan")
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM and wait: the exit code (raises TimeoutExpired if it does not stop in time)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as when the node's OOM killer or a crash takes the process."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10) -> int | None:
        """For cleanup: SIGTERM, SIGKILL after `timeout`; the exit code."""
        if self.running():
            try:
                return self.terminate(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode
