"""Issue 21 item 2: any pod can reach the webhook, unauthenticated. The attacks, on the real `webhook`
command in a memory cgroup of the test's own with the chart's limit: an 8 MiB body of nested lists (once
~260 MiB), ~650 idle TLS connections (once ~290 KiB each, never timed out: together an OOM kill), trickled
headers and bodies. The replica must survive and answer a normal AdmissionReview meanwhile. The peaks are
printed (`pytest -s`) for docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from install_helpers import injected_pod
from test_install_webhook import make_pki, review

from istio_pod_network_controller.install.webhook.server import (
    BODY_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_BODY_BYTES,
    MAX_JSON_VALUES,
)
from memcg import MemoryCgroup, memory_cgroup, vm_hwm

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]
VALUES = Path(__file__).parents[2] / "chart" / "istio-pod-network-controller" / "values.yaml"
IDLE_CONNECTIONS = 650
MiB = 1 << 20


def chart_webhook() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(VALUES.read_text())["webhook"]
    return values


def chart_memory_limit() -> int:
    limit = str(chart_webhook()["resources"]["limits"]["memory"])
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * MiB


def chart_max_connections() -> int:
    return int(chart_webhook()["maxConnections"])


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    group: MemoryCgroup
    url: str
    port: int
    context: ssl.SSLContext
    log: Path

    def sockets(self) -> int:
        """Open sockets of the replica (its connections and a few of its own)."""
        count = 0
        for fd in Path(f"/proc/{self.process.pid}/fd").iterdir():
            try:
                count += os.readlink(fd).startswith("socket:")
            except FileNotFoundError:  # closed between the listing and the read
                continue
        return count

    def alive(self) -> bool:
        return self.process.poll() is None and self.group.oom_kills() == 0

    def report(self, label: str) -> None:
        peak, hwm = self.group.peak() / MiB, vm_hwm(self.process.pid) / MiB
        limit = chart_memory_limit() / MiB
        print(f"\n{label}: cgroup peak {peak:.1f} MiB (page cache included), VmHWM {hwm:.1f} MiB, "
              f"limit {limit:.0f} MiB")  # fmt: skip


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Replica]:
    ca_file = make_pki(tmp_path)
    log = tmp_path / "webhook.log"
    with memory_cgroup(chart_memory_limit()) as group, log.open("wb") as out:
        process = group.spawn(
            [sys.executable, "-m", "istio_pod_network_controller", "webhook",
             "--listen-address=127.0.0.1:0", f"--tls-cert-file={tmp_path / 'tls.crt'}",
             f"--tls-key-file={tmp_path / 'tls.key'}", "--image=r/ipnc:test",
             f"--max-connections={chart_max_connections()}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            port = _listening_port(log, process)
            context = ssl.create_default_context(cafile=str(ca_file))
            yield Replica(process, group, f"https://127.0.0.1:{port}", port, context, log)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _listening_port(log: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "webhook listening on https://" in line:
                return int(line.rsplit(":", 1)[1].split("/")[0])
        assert process.poll() is None, log.read_text(errors="replace")
        time.sleep(0.05)
    raise AssertionError(f"the webhook never listened: {log.read_text(errors='replace')}")


@contextlib.asynccontextmanager
async def session(replica: Replica) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=replica.context, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as client:
        yield client


async def normal_review(replica: Replica) -> dict[str, Any]:
    """A real review of an injected pod, on a new connection: it must be rewritten."""
    url = replica.url + "/mutate"
    async with session(replica) as client, client.post(url, json=review(injected_pod())) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
    assert answer["response"]["allowed"] is True and answer["response"]["patchType"] == "JSONPatch"
    return answer


async def post(replica: Replica, body: Any) -> tuple[int, str]:
    async with session(replica) as client, client.post(replica.url + "/mutate", data=body) as response:
        return response.status, await response.text()


def nested_lists(size: int) -> bytes:
    """`[[],[],...]` of `size` bytes: the cheapest way to make a JSON parser allocate."""
    count = (size - 2) // 3
    return b"[" + b"[]," * count + b"[]]"


async def test_oversized_and_costly_bodies_leave_the_replica_answering(replica: Replica) -> None:
    eight = nested_lists(8 * MiB)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit must hold while reading
        for start in range(0, len(eight), MiB):
            yield eight[start : start + MiB]

    deep = b"[" * (MAX_JSON_VALUES - 10) + b"]" * (MAX_JSON_VALUES - 10)
    attacks = {
        "8 MiB announced": (eight, 413, "larger than"),
        "8 MiB chunked": (chunked(), 413, "larger than"),
        "just under the size limit": (nested_lists(MAX_BODY_BYTES - 64), 400, "JSON values"),
        "nested deeper than Python recurses": (deep, 400, "nested too deeply"),
    }
    for label, (body, status, reason) in attacks.items():
        (code, text), _ = await asyncio.gather(post(replica, body), normal_review(replica))
        assert (code, reason in text) == (status, True), f"{label}: {code} {text}"
        assert replica.alive(), f"{label}\n{replica.log.read_text()}"
    await normal_review(replica)
    assert replica.group.peak() < chart_memory_limit()
    replica.report("bodies")
    assert f"refused a {len(eight)}-byte body" in replica.log.read_text()


async def settled(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for `condition` (an evicted socket is closed in the event loop's next turn)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)
    assert condition(), what


async def hold_idle(replica: Replica, count: int, *, tls: bool = True) -> list[asyncio.StreamWriter]:
    """`count` connections that finish the TLS handshake (or, without `tls`, never start one) and then
    send nothing."""

    async def one() -> asyncio.StreamWriter | None:
        try:
            context = replica.context if tls else None
            _, writer = await asyncio.open_connection("127.0.0.1", replica.port, ssl=context)
        except (OSError, ssl.SSLError):
            return None  # evicted during its handshake: the cap at work
        return writer

    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 50):
        batch = await asyncio.gather(*(one() for _ in range(min(50, count - start))))
        writers.extend(w for w in batch if w is not None)
    return writers


async def test_hundreds_of_idle_tls_connections_leave_the_replica_answering(replica: Replica) -> None:
    baseline = replica.sockets()  # the listening socket and the event loop's own pair
    writers = await hold_idle(replica, IDLE_CONNECTIONS)
    try:
        assert replica.alive(), replica.log.read_text()
        at_cap = lambda: replica.sockets() - baseline <= chart_max_connections()  # noqa: E731
        await settled(at_cap, "connections down to the cap")
        await normal_review(replica)  # a new connection gets in: the oldest idle one makes room
        again = await hold_idle(replica, IDLE_CONNECTIONS)  # and once more, while the first are held
        writers.extend(again)
        await normal_review(replica)
        silent = await hold_idle(replica, IDLE_CONNECTIONS, tls=False)  # handshakes never started
        writers.extend(silent)
        await settled(at_cap, "connections down to the cap")
        await normal_review(replica)
        assert replica.alive(), replica.log.read_text()
        assert replica.group.peak() < chart_memory_limit()
        replica.report(f"{2 * IDLE_CONNECTIONS} idle TLS connections and {IDLE_CONNECTIONS} silent TCP ones")
        assert "closing the oldest idle one" in replica.log.read_text()
    finally:
        for writer in writers:
            writer.transport.abort()


async def test_slow_headers_slow_bodies_and_idle_connections_are_closed(replica: Replica) -> None:
    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", replica.port, ssl=replica.context)

    async def trickle_headers() -> bytes:
        reader, writer = await connect()
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: webhook\r\n")
        for i in range(10 * int(IDLE_TIMEOUT)):  # one header a second: headers never end
            writer.write(f"X-Slow-{i}: 1\r\n".encode())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    return await reader.read(65536)  # b"": closed by the server
        raise AssertionError("trickled headers were never cut off")

    async def trickle_body() -> bytes:
        reader, writer = await connect()
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{")  # fmt: skip
        for _ in range(10 * int(BODY_TIMEOUT)):
            writer.write(b" ")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    return await reader.read(65536)
        raise AssertionError("a trickled body was never cut off")

    async def idle() -> bytes:
        reader, _ = await connect()
        async with asyncio.timeout(10 * IDLE_TIMEOUT):
            return await reader.read(65536)

    headers, body, nothing = await asyncio.gather(trickle_headers(), trickle_body(), idle())
    assert headers == b"" and nothing == b"", (headers, nothing)
    assert body.startswith(b"HTTP/1.1 408"), body
    await normal_review(replica)
    assert replica.alive()
