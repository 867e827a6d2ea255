"""Authentication, RBAC denials, fault injection, the request log, TLS and bad input."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path

import aiohttp
import lightkube
import pytest
from lightkube.resources.core_v1 import Node, Pod
from lightkube.types import PatchType

from ipnc_lab.localapi import LocalAPIServer

from .conftest import Raw
from .test_lightkube import make_pod


def client_for(
    api: LocalAPIServer, path: Path, name: str, token: str, rules: list[dict[str, object]]
) -> lightkube.AsyncClient:
    user = api.add_user(name, token, rules)
    return lightkube.AsyncClient(config=lightkube.KubeConfig.from_file(api.write_kubeconfig(path, user)))


async def test_rbac_allows_exactly_the_granted_permissions(api: LocalAPIServer, tmp_path: Path) -> None:
    admin = lightkube.AsyncClient(config=lightkube.KubeConfig.from_file(api.kubeconfig_path))
    reader = client_for(
        api,
        tmp_path / "reader",
        "reader",
        "t-reader",
        [
            {
                "verbs": ["get", "list", "watch"],
                "resources": ["pods"],
                "apiGroups": [""],
                "namespaces": ["default"],
            },
            {"verbs": ["patch"], "resources": ["pods/status"]},
        ],
    )
    try:
        await admin.create(make_pod("p"))
        assert [p.metadata.name async for p in reader.list(Pod, namespace="default")] == ["p"]
        patched = await reader.patch(
            Pod.Status, "p", {"status": {"phase": "Running"}}, namespace="default", patch_type=PatchType.MERGE
        )
        assert patched.status.phase == "Running"

        async def denied(coro: object) -> str:
            with pytest.raises(lightkube.ApiError) as exc:
                await coro  # type: ignore[misc]
            assert (exc.value.status.code, exc.value.status.reason) == (403, "Forbidden")
            return str(exc.value.status.message)

        assert await denied(reader.list(Pod, namespace="*").__aiter__().__anext__()) == (
            'pods is forbidden: User "reader" cannot list resource "pods" in API group "" '
            "at the cluster scope"
        )
        assert await denied(reader.create(make_pod("q"))) == (
            'pods is forbidden: User "reader" cannot create resource "pods" in API group "" '
            'in the namespace "default"'
        )
        assert await denied(
            reader.patch(
                Pod,
                "p",
                {"metadata": {"labels": {"a": "b"}}},
                namespace="default",
                patch_type=PatchType.MERGE,
            )
        ) == (
            'pods "p" is forbidden: User "reader" cannot patch resource "pods" in API group "" '
            'in the namespace "default"'
        )
        assert 'cannot get resource "nodes"' in await denied(reader.get(Node, "n1"))
        assert api.requests.count(verb="create", resource="pods", status=403) == 1
    finally:
        await admin.close()
        await reader.close()


async def test_authentication(api: LocalAPIServer, raw: Raw) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(api.url + "/api/v1/pods", headers={"Authorization": "Bearer wrong"}) as resp:
            body = await resp.json()
            assert (resp.status, body["reason"], body["kind"]) == (401, "Unauthorized", "Status")
        # Without TLS a request without credentials acts as the admin (kubectl sends no token over http).
        async with s.get(api.url + "/api/v1/pods") as resp:
            assert resp.status == 200
    async with (
        LocalAPIServer(anonymous=False) as strict,
        aiohttp.ClientSession() as s,
        s.get(strict.url + "/api/v1/pods") as resp,
    ):
        assert resp.status == 401


async def test_tls_server_with_lightkube(tmp_path: Path) -> None:
    async with LocalAPIServer(tls=True) as api:
        assert api.url.startswith("https://127.0.0.1:")
        c = lightkube.AsyncClient(config=lightkube.KubeConfig.from_file(api.kubeconfig_path))
        try:
            await c.create(make_pod("p"))
            assert [p.metadata.name async for p in c.list(Pod, namespace="default")] == ["p"]
        finally:
            await c.close()
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await s.get(api.url + "/version")
            ctx = ssl.create_default_context(cadata=api.ca_pem.decode() if api.ca_pem else None)
            async with s.get(api.url.replace("127.0.0.1", "localhost") + "/version", ssl=ctx) as resp:
                assert (
                    resp.status == 401
                )  # TLS verifies for the DNS name too; no token, no anonymous with TLS


async def test_fail_next_with_500_and_429(
    client: lightkube.AsyncClient, raw: Raw, api: LocalAPIServer
) -> None:
    api.faults.fail_next(2, status=500, verb="list", resource="pods")
    api.faults.fail_next(1, status=429, verb="create", retry_after=3)
    for _ in range(2):
        status, body, _ = await raw.request("GET", "/api/v1/pods")
        assert (status, body["reason"]) == (500, "InternalError")
    status, _, _ = await raw.request("GET", "/api/v1/pods")
    assert status == 200
    status, body, resp = await raw.request(
        "POST", "/api/v1/namespaces/default/pods", {"metadata": {"name": "x"}}
    )
    assert (status, body["reason"], resp.headers["Retry-After"]) == (429, "TooManyRequests", "3")
    assert body["details"]["retryAfterSeconds"] == 3
    created = await client.create(make_pod("x"))
    assert created.metadata.name == "x"
    assert api.faults.state()["failures"] == []


async def test_latency_and_pause(raw: Raw, api: LocalAPIServer) -> None:
    api.faults.set_latency(0.2)
    started = time.monotonic()
    status, _, _ = await raw.request("GET", "/version")
    assert status == 200
    assert time.monotonic() - started >= 0.2
    api.faults.set_latency(0)
    api.faults.pause()
    task = asyncio.create_task(raw.request("GET", "/api/v1/pods"))
    await asyncio.sleep(0.2)
    assert not task.done()
    api.faults.resume()
    status, _, _ = await asyncio.wait_for(task, 2)
    assert status == 200


async def test_faults_and_request_log_over_http(raw: Raw, api: LocalAPIServer) -> None:
    status, state, _ = await raw.request(
        "POST", "/_emulator/faults", {"action": "fail", "count": 1, "status": 503, "resource": "nodes"}
    )
    assert status == 200
    assert state["failures"][0]["status"] == 503
    assert (await raw.request("GET", "/api/v1/pods"))[0] == 200
    status, body, _ = await raw.request("GET", "/api/v1/nodes")
    assert (status, body["reason"]) == (503, "ServiceUnavailable")
    status, body, _ = await raw.request("POST", "/_emulator/faults", {"action": "explode"})
    assert status == 400
    await raw.request("DELETE", "/_emulator/requests")
    await raw.request("GET", "/api/v1/namespaces/default/pods/nope")
    status, records, _ = await raw.request("GET", "/_emulator/requests")
    assert status == 200
    assert [
        (r["verb"], r["resource"], r["namespace"], r["name"], r["user"], r["status"]) for r in records
    ] == [("get", "pods", "default", "nope", "admin", 404)]
    status, state, _ = await raw.request("POST", "/_emulator/faults", {"action": "restart"})
    assert status == 200
    assert api.store.oldest_resumable_rv == api.store.resource_version


async def test_bad_input_never_crashes(
    raw: Raw, api: LocalAPIServer, caplog: pytest.LogCaptureFixture
) -> None:
    pods = "/api/v1/namespaces/default/pods"
    json_ct = "application/json"
    bad_watch = {"watch": "1", "resourceVersion": "abc"}
    cases: list[tuple[str, str, object, str, dict[str, str], int, str]] = [
        ("POST", pods, b"{nope", json_ct, {}, 400, "BadRequest"),
        ("POST", pods, b"[1]", json_ct, {}, 400, "BadRequest"),
        ("POST", pods, b"x", "text/plain", {}, 415, "UnsupportedMediaType"),
        (
            "POST",
            pods,
            {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n"}},
            json_ct,
            {},
            400,
            "BadRequest",
        ),
        ("POST", pods, {"metadata": {}}, json_ct, {}, 422, "Invalid"),
        ("GET", "/api/v1/widgets", None, json_ct, {}, 404, "NotFound"),
        ("GET", "/apis/nope.example.com/v1/things", None, json_ct, {}, 404, "NotFound"),
        ("GET", pods + "/x/exec", None, json_ct, {}, 404, "NotFound"),
        ("POST", pods + "/x", None, json_ct, {}, 405, "MethodNotAllowed"),
        ("GET", pods, None, json_ct, bad_watch, 400, "BadRequest"),
        ("GET", pods, None, json_ct, {"timeoutSeconds": "soon", "watch": "1"}, 400, "BadRequest"),
    ]
    for method, path, body, ctype, params, code, reason in cases:
        status, resp_body, _ = await raw.request(method, path, body, content_type=ctype, **params)
        assert (status, resp_body["reason"], resp_body["kind"]) == (code, reason, "Status"), (
            method,
            path,
            resp_body,
        )

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("kaboom")

    api.store.get = boom  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        status, body, _ = await raw.request("GET", pods + "/x")
    assert (status, body["reason"]) == (500, "InternalError")
    assert "kaboom" in caplog.text
    status, _, _ = await raw.request("GET", pods)
    assert status == 200  # the server carries on


async def test_a_failing_watch_stream_ends_and_is_logged(
    raw: Raw, api: LocalAPIServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ipnc_lab.localapi.store import Watcher

    def broken(self: Watcher, change: object) -> bytes:
        raise RuntimeError("translate broke")

    rv = str(api.store.resource_version)
    monkeypatch.setattr(Watcher, "translate", broken)
    task = asyncio.create_task(raw.watch_lines("/api/v1/pods", count=1, resourceVersion=rv))
    while api.store.watcher_count() == 0:
        await asyncio.sleep(0.01)
    with caplog.at_level(logging.ERROR):
        await raw.request("POST", "/api/v1/namespaces/default/pods", {"metadata": {"name": "p"}})
        assert await asyncio.wait_for(task, 5) == []  # the stream ended without an event
    assert "translate broke" in caplog.text
    assert api.store.watcher_count() == 0
    assert (await raw.request("GET", "/api/v1/pods"))[0] == 200
