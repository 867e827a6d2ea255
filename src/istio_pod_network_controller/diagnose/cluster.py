"""The API reads of `status` and `rules verify --pod`, with errors a user can act on.

Plain GETs on an httpx client lightkube builds from the kubeconfig (its TLS and auth handling), returning the
API's JSON as dicts: no model decoding that a malformed object could break, and the controller's own pure
code (selection, spec) sees exactly what its informer sees.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

import httpx2 as httpx
from lightkube.config.client_adapter import Client as adapter_client
from lightkube.config.client_adapter import ConnectionParams

from ..controller.kubeconfig import Loaded
from ..errors import ControllerError

Obj = Mapping[str, Any]
TIMEOUT: Final = 10.0
CONTROLLER_SELECTOR: Final = (
    "app.kubernetes.io/name=istio-pod-network-controller,app.kubernetes.io/component=controller"
)
"""The chart's selector labels of the DaemonSet's pods."""


class ClusterError(ControllerError):
    """An API read failed; `kind` is "unreachable", "denied", "not-found" or "failed"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Cluster:
    def __init__(self, loaded: Loaded) -> None:
        self.server = loaded.server
        try:
            self._http = adapter_client(loaded.config, ConnectionParams(timeout=httpx.Timeout(TIMEOUT)))
        except (OSError, ValueError) as exc:
            raise ClusterError("unreachable", f"cannot set up a connection to {self.server}: {exc}") from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _get(self, what: str, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        try:
            response = self._http.get(path, params=dict(params or {}))
        except (httpx.HTTPError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise ClusterError(
                "unreachable", f"cannot reach the API server {self.server}: {detail}"
            ) from None
        code = response.status_code
        if code == 404:
            raise ClusterError("not-found", f"{what}: not found")
        if code >= 400:
            message = _message(response.content)
            kind = "denied" if code in (401, 403) else "failed"
            raise ClusterError(kind, f"{what}: the API server {self.server} said {code}: {message}")
        try:
            body = json.loads(response.content)
        except ValueError:
            raise ClusterError("failed", f"{what}: the API server {self.server} sent no JSON") from None
        if not isinstance(body, dict):
            raise ClusterError("failed", f"{what}: the API server {self.server} sent no object")
        return body

    def _items(self, what: str, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        items = self._get(what, path, params).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        return self._get(f"pod {namespace}/{name}", path)

    def namespace(self, name: str) -> dict[str, Any] | None:
        try:
            return self._get(f"namespace {name}", f"/api/v1/namespaces/{quote(name, safe='')}")
        except ClusterError as exc:
            if exc.kind == "not-found":
                return None
            raise

    def controller_pods(self, namespace: str, node: str) -> list[dict[str, Any]]:
        params = {"labelSelector": CONTROLLER_SELECTOR, "fieldSelector": f"spec.nodeName={node}"}
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods"
        return self._items(f"controller pods in {namespace}", path, params)

    def events(self, namespace: str, uid: str) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/events"
        return self._items(f"events of pod {uid}", path, {"fieldSelector": f"involvedObject.uid={uid}"})


def _message(body: bytes) -> str:
    try:
        status = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    return str(status.get("message", "")) if isinstance(status, dict) else ""
