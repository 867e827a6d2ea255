"""The API reads of `status` and `rules verify --pod` (synchronous lightkube), with errors a user can act on.

Objects come back as plain dicts (the API's JSON), so the controller's own pure code (selection, spec) sees
exactly what it sees in the informer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import httpx2 as httpx
import lightkube
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Event, Namespace, Pod

from ..controller.kubeconfig import Loaded
from ..errors import ControllerError

Obj = Mapping[str, Any]
TIMEOUT: Final = 10.0
CONTROLLER_LABELS: Final[dict[str, str | None]] = {
    "app.kubernetes.io/name": "istio-pod-network-controller",
    "app.kubernetes.io/component": "controller",
}
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
            self._client = lightkube.Client(config=loaded.config, timeout=httpx.Timeout(TIMEOUT))
        except (OSError, ValueError) as exc:
            raise ClusterError("unreachable", f"cannot set up a connection to {self.server}: {exc}") from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            code = int(exc.status.code or 0)
            message = str(exc.status.message or exc)
            if code == 404:
                raise ClusterError("not-found", f"{what}: not found") from None
            if code in (401, 403):
                raise ClusterError(
                    "denied", f"{what}: the API server {self.server} said {code}: {message}"
                ) from None
            raise ClusterError(
                "failed", f"{what}: the API server {self.server} said {code}: {message}"
            ) from None
        except (httpx.HTTPError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise ClusterError(
                "unreachable", f"cannot reach the API server {self.server}: {detail}"
            ) from None

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        found = self._call(f"pod {namespace}/{name}", self._client.get, Pod, name, namespace=namespace)
        return dict(found.to_dict())

    def namespace(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self._call(f"namespace {name}", self._client.get, Namespace, name).to_dict())
        except ClusterError as exc:
            if exc.kind == "not-found":
                return None
            raise

    def controller_pods(self, namespace: str, node: str) -> list[dict[str, Any]]:
        items = self._call(
            f"controller pods in {namespace}",
            lambda: list(
                self._client.list(
                    Pod, namespace=namespace, labels=dict(CONTROLLER_LABELS), fields={"spec.nodeName": node}
                )
            ),
        )
        return [dict(item.to_dict()) for item in items]

    def events(self, namespace: str, uid: str) -> list[dict[str, Any]]:
        items = self._call(
            f"events of pod {uid}",
            lambda: list(self._client.list(Event, namespace=namespace, fields={"involvedObject.uid": uid})),
        )
        return [dict(item.to_dict()) for item in items]
