"""A small synchronous client for the real API server (admin certificate): enough for the tier's tests."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

Obj = dict[str, Any]


class APIError(RuntimeError):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"API answered {status}: {text[:300]}")
        self.status = status


class KubeAPI:
    def __init__(self, port: int, ca: Path, cert: Path, key: Path) -> None:
        self.port = port
        self._ctx = ssl.create_default_context(cafile=str(ca))
        self._ctx.load_cert_chain(str(cert), str(key))

    def _connection(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ctx, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        *,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Obj:
        conn = self._connection(timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Accept": "application/json", "Content-Type": content_type}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            text = response.read().decode(errors="replace")
        finally:
            conn.close()
        if response.status >= 300:
            raise APIError(response.status, text)
        result: Obj = json.loads(text) if text else {}
        return result

    def get(self, path: str) -> Obj:
        return self.request("GET", path)

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: Obj) -> Obj:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, *, grace: int | None = None) -> None:
        body = {"gracePeriodSeconds": grace} if grace is not None else None
        try:
            self.request("DELETE", path, body)
        except APIError as exc:
            if exc.status != 404:
                raise

    def ready(self) -> bool:
        try:
            conn = self._connection(2.0)
            try:
                conn.request("GET", "/readyz")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except OSError:
            return False

    def pods(self, namespace: str, **params: str) -> list[Obj]:
        query = f"?{urlencode(params)}" if params else ""
        items: list[Obj] = self.get(f"/api/v1/namespaces/{quote(namespace)}/pods{query}")["items"]
        return items

    def watch_pods(self, namespace: str, deadline: float, **params: str) -> Iterator[tuple[float, Obj]]:
        """(arrival time.monotonic(), event) for the pods of `namespace` until `deadline` (monotonic). The
        watch is established when this returns (the API server has answered), not at the first event."""
        seconds = str(max(1, int(deadline - time.monotonic())))
        query = urlencode({**params, "watch": "1", "timeoutSeconds": seconds})
        conn = self._connection(max(1.0, deadline - time.monotonic()) + 5)
        try:
            conn.request("GET", f"/api/v1/namespaces/{quote(namespace)}/pods?{query}")
            response = conn.getresponse()
            if response.status != 200:
                raise APIError(response.status, response.read().decode(errors="replace"))
        except BaseException:
            conn.close()
            raise
        return _events(conn, response, deadline)


def _events(
    conn: http.client.HTTPSConnection, response: http.client.HTTPResponse, deadline: float
) -> Iterator[tuple[float, Obj]]:
    try:
        while time.monotonic() < deadline:
            line = response.readline()
            if not line:
                return
            yield time.monotonic(), json.loads(line)
    finally:
        conn.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
