"""Benchmark of the Kubernetes API emulator: pod creates/s and watch fan-out latency.

Run as `.venv/bin/python bench/localapi_bench.py`; prints a Markdown section to stdout.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from ipnc_lab.localapi import NAMESPACES, PODS, Store

CREATES_IN_STORE = 20_000
CREATES_HTTP = 5_000
CONNECTIONS = 8
WATCHERS = 100
ROUNDS = 15


def pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "bench"}},
        "spec": {"containers": [{"name": "app", "image": "busybox"}], "nodeName": "node-1"},
    }


def bench_store() -> float:
    store = Store(history_size=1000)
    store.seed(NAMESPACES, [{"metadata": {"name": "default"}}])
    manifests = [pod(f"p-{i}") for i in range(CREATES_IN_STORE)]
    started = time.perf_counter()
    for m in manifests:
        store.create(PODS, "default", m)
    return CREATES_IN_STORE / (time.perf_counter() - started)


def start_server(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    """The emulator in its own process, as a controller under test would meet it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ipnc_lab",
            "local-apiserver",
            "--kubeconfig",
            str(workdir / "kubeconfig"),
            "--history-size",
            "20000",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("url: "):
        proc.kill()
        raise SystemExit(f"emulator did not start: {line!r}")
    return proc, line.removeprefix("url: ").strip()


async def bench_http_creates(url: str) -> float:
    body = [json.dumps(pod(f"h-{i}")).encode() for i in range(CREATES_HTTP)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in body:
        queue.put_nowait(b)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                data = queue.get_nowait()
                async with session.post(
                    f"{url}/api/v1/namespaces/default/pods", data=data, headers=headers
                ) as r:
                    assert r.status == 201, await r.text()
                    await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
        return CREATES_HTTP / (time.perf_counter() - started)


async def bench_fanout(url: str) -> list[float]:
    """Seconds from sending one create until every one of WATCHERS watch streams has delivered it."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        async with session.get(f"{url}/_emulator/healthz") as r:
            rv = (await r.json())["resourceVersion"]
        path = f"{url}/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv}&labelSelector=app%3Dfan"
        received: list[asyncio.Queue[float]] = [asyncio.Queue() for _ in range(WATCHERS)]

        async def watcher(q: asyncio.Queue[float]) -> None:
            async with session.get(path) as resp:
                async for _line in resp.content:
                    q.put_nowait(time.perf_counter())

        tasks = [asyncio.create_task(watcher(q)) for q in received]
        while True:
            async with session.get(f"{url}/_emulator/healthz") as r:
                if (await r.json())["watchers"] >= WATCHERS:
                    break
            await asyncio.sleep(0.05)
        latencies = []
        for i in range(ROUNDS):
            data = json.dumps({**pod(f"fan-{i}"), "metadata": {"name": f"fan-{i}", "labels": {"app": "fan"}}})
            started = time.perf_counter()
            async with session.post(
                f"{url}/api/v1/namespaces/default/pods",
                data=data,
                headers={"Content-Type": "application/json"},
            ) as r:
                assert r.status == 201
            arrivals = [await q.get() for q in received]
            latencies.append(max(arrivals) - started)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return latencies


def main() -> None:
    in_store = bench_store()
    with tempfile.TemporaryDirectory(prefix="localapi-bench-") as tmp:
        proc, url = start_server(Path(tmp))
        try:
            http_rate = asyncio.run(bench_http_creates(url))
            latencies = asyncio.run(bench_fanout(url))
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
    nproc = os.cpu_count()
    print("## API emulator\n")
    print(
        f"Measured {datetime.date.today().isoformat()} on a machine with nproc={nproc} "
        f"(Python {sys.version.split()[0]}); server in its own process, client aiohttp.\n"
    )
    print("| measurement | result |")
    print("|---|---|")
    print(f"| pod creates/s, in-store (no HTTP, {CREATES_IN_STORE} pods) | {in_store:,.0f} |")
    print(f"| pod creates/s over HTTP ({CONNECTIONS} connections, {CREATES_HTTP} pods) | {http_rate:,.0f} |")
    print(
        f"| one create until all {WATCHERS} HTTP watchers got the event, median of {ROUNDS} "
        f"(min / max) | {statistics.median(latencies) * 1000:.1f} ms "
        f"({min(latencies) * 1000:.1f} / {max(latencies) * 1000:.1f} ms) |"
    )


if __name__ == "__main__":
    main()
