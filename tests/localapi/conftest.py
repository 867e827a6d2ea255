"""Fixtures: an in-process emulator (async and threaded) and clients configured from its kubeconfig."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import lightkube
import pytest

from ipnc_lab.localapi import LocalAPIServer, ThreadedServer


def pod_manifest(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    }


@pytest.fixture
async def api() -> AsyncIterator[LocalAPIServer]:
    server = LocalAPIServer(bookmark_interval=0.2, history_size=50)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(api: LocalAPIServer) -> AsyncIterator[lightkube.AsyncClient]:
    c = lightkube.AsyncClient(config=lightkube.KubeConfig.from_file(api.kubeconfig_path))
    try:
        yield c
    finally:
        await c.close()


class Raw:
    """Plain HTTP access with the admin token, to check the wire format clients hide."""

    def __init__(self, api: LocalAPIServer, session: aiohttp.ClientSession) -> None:
        self.api = api
        self.session = session
        self.headers = {"Authorization": f"Bearer {api.admin.token}"}

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        **params: str,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        async with self.session.request(
            method,
            self.api.url + path,
            data=data,
            params=params,
            headers={**self.headers, "Content-Type": content_type},
        ) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text.startswith(("{", "[")) else text, resp

    async def watch_lines(
        self, path: str, *, count: int, timeout: float = 5.0, **params: str
    ) -> list[dict[str, Any]]:
        """Read `count` watch events (or until the stream ends)."""
        out: list[dict[str, Any]] = []
        async with self.session.get(
            self.api.url + path,
            params={"watch": "1", **params},
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            assert resp.status == 200
            async for line in resp.content:
                out.append(json.loads(line))
                if len(out) >= count:
                    break
        return out


@pytest.fixture
async def raw(api: LocalAPIServer) -> AsyncIterator[Raw]:
    async with aiohttp.ClientSession() as session:
        yield Raw(api, session)


@pytest.fixture
def threaded() -> Iterator[ThreadedServer]:
    handle = LocalAPIServer(bookmark_interval=0.2).start_in_thread()
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def threaded_tls() -> Iterator[ThreadedServer]:
    handle = LocalAPIServer(tls=True).start_in_thread()
    try:
        yield handle
    finally:
        handle.stop()
