"""The emulator's kube-apiserver restart (refused connections, a 403 window, 410 on resume), its mode without
bookmarks, and its hostile modes (garbage bodies, instant-close and stalled watches, ignored selectors)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from ipnc_lab.localapi import PODS, Hostile, LocalAPIServer

from .conftest import Raw

READER = [{"verbs": ["get", "list", "watch"], "resources": ["pods"]}]


def pod(name: str, node: str = "n1") -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "default"}, "spec": {"nodeName": node, "containers": []}}


async def until(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def get(session: aiohttp.ClientSession, api: LocalAPIServer, path: str, token: str) -> int | str:
    """The HTTP status, or the name of the connection error when nothing answered."""
    try:
        async with session.get(api.url + path, headers={"Authorization": f"Bearer {token}"}) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def test_restart_refuses_then_forbids_then_expires_old_versions(api: LocalAPIServer, raw: Raw) -> None:
    api.add_user("reader", "t-reader", READER)
    api.store.seed(PODS, [pod("a")])
    old_rv = str(api.store.resource_version)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        assert await get(session, api, "/api/v1/pods", "t-reader") == 200
        restart = api.faults.restart(down=0.5, rbac_delay=0.6)
        await asyncio.sleep(0.05)
        assert await get(session, api, "/api/v1/pods", "t-reader") == "ClientConnectorError"
        await until(lambda: restart.listening is not None)
        # Listening again: /readyz says ok, yet a normal user is forbidden; the admin is not.
        statuses = [await get(session, api, p, "t-reader") for p in ("/readyz", "/api/v1/pods")]
        assert statuses == [200, 403]
        assert await get(session, api, "/api/v1/pods", api.admin.token) == 200
        await until(lambda: time.time() >= (restart.rbac_ready or 0))
        assert await get(session, api, "/api/v1/pods", "t-reader") == 200
    assert restart.rbac_ready == pytest.approx((restart.listening or 0) + 0.6)
    events = await raw.watch_lines("/api/v1/pods", count=1, resourceVersion=old_rv)
    assert (events[0]["type"], events[0]["object"]["code"]) == ("ERROR", 410)


async def test_restart_ends_open_watches_and_cuts_kept_alive_connections(
    api: LocalAPIServer, raw: Raw
) -> None:
    watching = asyncio.create_task(raw.watch_lines("/api/v1/pods", count=100, timeout=20))
    await until(lambda: api.store.watcher_count() == 1)
    restart = api.faults.restart(down=0.3)
    assert await asyncio.wait_for(watching, 5) == []  # the stream ended cleanly, nothing sent
    await until(lambda: restart.listening is not None)
    status, _, _ = await raw.request("GET", "/api/v1/pods")  # the session reconnects
    assert status == 200


async def test_without_bookmarks_a_quiet_watch_sends_nothing(api: LocalAPIServer, raw: Raw) -> None:
    api.faults.set_bookmarks(False)
    rv = str(api.store.resource_version)
    quiet = await raw.watch_lines(
        "/api/v1/pods", count=1, resourceVersion=rv, allowWatchBookmarks="true", timeoutSeconds="1"
    )
    assert quiet == []  # one second, five bookmark intervals of the fixture: nothing at all
    api.faults.set_bookmarks(True)
    marks = await raw.watch_lines("/api/v1/pods", count=1, resourceVersion=rv, allowWatchBookmarks="true")
    assert marks[0]["type"] == "BOOKMARK"


@pytest.mark.parametrize(
    "body", [b"[]", b'{"items": [1, "x"], "metadata": {"resourceVersion": "1"}}', b"null"]
)
async def test_garbage_list_bodies(api: LocalAPIServer, raw: Raw, body: bytes) -> None:
    api.faults.set_hostile(Hostile(list_body=body))
    async with raw.session.get(api.url + "/api/v1/pods", headers=raw.headers) as resp:
        assert (resp.status, await resp.read()) == (200, body)
    status, got, _ = await raw.request("GET", "/api/v1/namespaces")  # other resources stay correct
    assert status == 200 and got["kind"] == "NamespaceList"


async def test_garbage_watch_lines_then_the_end(api: LocalAPIServer, raw: Raw) -> None:
    api.faults.set_hostile(Hostile(watch_lines=(b"null", b'{"object":"x"}')))
    async with raw.session.get(api.url + "/api/v1/pods", params={"watch": "1"}, headers=raw.headers) as resp:
        assert resp.status == 200
        assert await resp.read() == b'null\n{"object":"x"}\n'


@pytest.mark.parametrize("kind", ["BOOKMARK", "MODIFIED"])
async def test_instant_close_sends_one_event_and_ends(api: LocalAPIServer, raw: Raw, kind: str) -> None:
    api.store.seed(PODS, [pod("a")])
    api.faults.set_hostile(Hostile(instant_close=kind))
    for _ in range(3):
        events = await raw.watch_lines("/api/v1/pods", count=5, allowWatchBookmarks="true")
        assert [e["type"] for e in events] == [kind]


async def test_stalled_watch_holds_the_connection_and_swallows_changes(api: LocalAPIServer, raw: Raw) -> None:
    api.faults.set_hostile(Hostile(stall=True))
    watching = asyncio.create_task(raw.watch_lines("/api/v1/pods", count=5, timeout=20))
    await until(lambda: api.store.watcher_count() == 1)
    api.store.seed(PODS, [pod("a"), pod("b")])
    await asyncio.sleep(0.3)
    assert not watching.done()
    api.faults.drop_watches()
    assert [e["type"] for e in await asyncio.wait_for(watching, 5)] == ["BOOKMARK"]


async def test_ignored_selectors_send_every_node(api: LocalAPIServer, raw: Raw) -> None:
    api.store.seed(PODS, [pod("mine"), pod("theirs", node="n2")])
    api.faults.set_hostile(Hostile(ignore_selectors=True))
    _, body, _ = await raw.request("GET", "/api/v1/pods", fieldSelector="spec.nodeName=n1")
    assert sorted(p["metadata"]["name"] for p in body["items"]) == ["mine", "theirs"]
    events = await raw.watch_lines(
        "/api/v1/pods", count=2, resourceVersion="0", fieldSelector="spec.nodeName=n1"
    )
    assert sorted(e["object"]["metadata"]["name"] for e in events) == ["mine", "theirs"]


async def test_http_form(api: LocalAPIServer, raw: Raw) -> None:
    command = {"action": "hostile", "list_body_b64": "W10=", "instant_close": "BOOKMARK"}
    status, state, _ = await raw.request("POST", "/_emulator/faults", command)
    assert status == 200
    assert state["hostile"]["list_body"] is True and state["hostile"]["instant_close"] == "BOOKMARK"
    status, state, _ = await raw.request(
        "POST", "/_emulator/faults", {"action": "bookmarks", "enabled": False}
    )
    assert state["bookmarks"] is False
    status, state, _ = await raw.request("POST", "/_emulator/faults", {"action": "restart", "rbac_delay": 30})
    assert state["forbidding"] is True and state["restart"]["rbac_delay"] == 30
    status, state, _ = await raw.request("POST", "/_emulator/faults", {"action": "clear"})
    assert (
        state["forbidding"] is False and state["bookmarks"] is True and state["hostile"]["list_body"] is False
    )


async def test_stopping_during_an_outage() -> None:
    api = LocalAPIServer()
    await api.start()
    restart = api.faults.restart(down=30)
    await asyncio.sleep(0.05)
    await api.stop()  # does not wait for the outage to end
    assert restart.listening is None
