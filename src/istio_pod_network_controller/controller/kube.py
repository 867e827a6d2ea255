"""The Kubernetes client: lightkube for configuration, auth, patches and Events; list/watch done here.

lightkube's watch API cannot send allowWatchBookmarks, silently re-watches from "now" after 410 Gone when
asked to retry, and keeps no read timeout on its streams. The Informer below owns the whole list-then-watch
protocol instead, on an httpx client built by lightkube from the same KubeConfig (same TLS and bearer-token
handling, including service-account token files re-read after a 401), and hands raw JSON objects to the
caches so the relist diff and the pure selection see exactly what the API server sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httpx2 as httpx
import lightkube
from lightkube.config.client_adapter import AsyncClient as _adapter_client
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Event, Pod
from lightkube.types import PatchType

from .backoff import Backoff, jittered
from .cache import Obj
from .config import WatchTuning
from .metrics import Metrics

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 10.0


class ApiStatusError(Exception):
    """An API request that failed: HTTP code (0 when no response arrived), reason, and Retry-After."""

    def __init__(self, code: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.retry_after = retry_after


class WatchStalled(Exception):
    """Nothing (not even a bookmark) arrived on a watch stream for the inactivity limit."""


def _retry_after(headers: httpx.Headers, status: Obj) -> float | None:
    raw = headers.get("Retry-After")
    if raw and raw.strip().isdigit():
        return float(raw)
    seconds = (status.get("details") or {}).get("retryAfterSeconds")
    return float(seconds) if isinstance(seconds, int | float) else None


def status_error(code: int, body: bytes | str, headers: httpx.Headers | None = None) -> ApiStatusError:
    try:
        status = json.loads(body)
    except ValueError:
        status = {}
    if not isinstance(status, dict):
        status = {}
    return ApiStatusError(
        code,
        str(status.get("reason", "")),
        str(status.get("message", body[:200] if isinstance(body, str) else body[:200].decode("latin-1"))),
        _retry_after(headers or httpx.Headers(), status),
    )


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def load_config(kubeconfig: str | None, service_account: str = SERVICE_ACCOUNT_DIR) -> SingleConfig:
    """--kubeconfig, else the pod's service account (its token file is re-read when the server says 401)."""
    config = (
        KubeConfig.from_file(kubeconfig)
        if kubeconfig
        else KubeConfig.from_service_account(service_account=service_account)
    )
    single = config.get()
    if single is None:
        raise ValueError(f"{kubeconfig or 'service account'}: no usable context")
    return single


class KubeClient:
    def __init__(self, config: SingleConfig, metrics: Metrics) -> None:
        self.metrics = metrics
        self._http: httpx.AsyncClient = _adapter_client(
            config, ConnectionParams(timeout=httpx.Timeout(REQUEST_TIMEOUT))
        )
        self._lk = lightkube.AsyncClient(config=config, timeout=httpx.Timeout(REQUEST_TIMEOUT))

    async def close(self) -> None:
        await self._http.aclose()
        await self._lk.close()

    def _count(self, code: int) -> None:
        self.metrics.api_errors.labels(str(code)).inc()

    async def list(self, path: str, params: dict[str, str]) -> tuple[list[Obj], str]:
        try:
            response = await self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            self._count(0)
            raise ApiStatusError(0, type(exc).__name__, str(exc) or repr(exc)) from exc
        if response.status_code >= 400:
            self._count(response.status_code)
            raise status_error(response.status_code, response.content, response.headers)
        body = response.json()
        return list(body.get("items") or ()), str(body["metadata"]["resourceVersion"])

    @contextlib.asynccontextmanager
    async def stream(self, path: str, params: dict[str, str]) -> AsyncIterator[httpx.Response]:
        """A watch response with no read timeout (the Informer's watchdog replaces it)."""
        timeout = httpx.Timeout(REQUEST_TIMEOUT, read=None)
        try:
            async with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    body = await response.aread()
                    self._count(response.status_code)
                    raise status_error(response.status_code, body, response.headers)
                yield response
        except httpx.HTTPError as exc:
            self._count(0)
            raise ApiStatusError(0, type(exc).__name__, str(exc) or repr(exc)) from exc

    def _translate(self, exc: Exception) -> ApiStatusError:
        if isinstance(exc, ApiError):
            code = int(exc.status.code or 0)
            headers = exc.response.headers if exc.response is not None else httpx.Headers()
            details = exc.status.details
            retry = getattr(details, "retryAfterSeconds", None) if details is not None else None
            after = _retry_after(headers, {"details": {"retryAfterSeconds": retry}})
            error = ApiStatusError(code, str(exc.status.reason or ""), str(exc.status.message or ""), after)
        elif isinstance(exc, httpx.HTTPStatusError):
            error = status_error(exc.response.status_code, exc.response.content, exc.response.headers)
        else:
            error = ApiStatusError(0, type(exc).__name__, str(exc) or repr(exc))
        self._count(error.code)
        return error

    async def patch_pod_annotations(
        self, namespace: str, name: str, annotations: dict[str, str]
    ) -> str | None:
        """One JSON merge patch of metadata.annotations; the pod's resourceVersion after it."""
        body = {"metadata": {"annotations": annotations}}
        try:
            patched = await self._lk.patch(Pod, name, body, namespace=namespace, patch_type=PatchType.MERGE)
        except (httpx.HTTPError, ApiError) as exc:
            raise self._translate(exc) from exc
        version = getattr(getattr(patched, "metadata", None), "resourceVersion", None)
        return version if isinstance(version, str) else None

    async def create_event(self, event: dict[str, Any], attempts: int = 4) -> None:
        """Create a core/v1 Event, retrying 429/5xx/connection failures; AlreadyExists means recorded."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        obj = cast(Event, Event.from_dict(event))
        for attempt in range(attempts):
            try:
                await self._lk.create(obj)
                return
            except (httpx.HTTPError, ApiError) as exc:
                error = self._translate(exc)
                if error.code == 409:
                    return
                if (error.code not in (0, 429) and error.code < 500) or attempt == attempts - 1:
                    raise error from exc
                await asyncio.sleep(backoff.next(error.retry_after))


class Expired(Exception):
    """410 Gone: the resourceVersion is older than the server's history; relist."""


class Informer:
    """List, then watch from the list's resourceVersion, forever; never loses a change.

    - 410 Gone (an ERROR event or an HTTP 410) → relist after a random delay, diff against the cache;
    - every failure → jittered exponential backoff (Retry-After honoured);
    - BOOKMARK events only move the resourceVersion (allowWatchBookmarks=true is always sent);
    - a jittered server-side timeoutSeconds ends streams regularly, and a watchdog restarts a stream that
      delivered nothing for `inactivity` seconds.
    """

    def __init__(
        self,
        resource: str,
        client: KubeClient,
        path: str,
        params: dict[str, str],
        on_list: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        metrics: Metrics,
        tuning: WatchTuning,
    ) -> None:
        self.resource = resource
        self.client = client
        self.path = path
        self.params = params
        self.on_list = on_list
        self.on_event = on_event
        self.metrics = metrics
        self.tuning = tuning
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.last_activity = time.monotonic()
        self._backoff = Backoff(initial=0.2, maximum=30.0)

    async def run(self) -> None:
        while True:
            try:
                if self.resource_version is None:
                    await self._relist()
                started = time.monotonic()
                received = await self._watch()
                self.metrics.watch_restarts.labels(self.resource, "closed").inc()
                if received == 0 and time.monotonic() - started < 1.0:
                    await asyncio.sleep(self._backoff.next())  # a server ending streams at once: no hot loop
            except Expired:
                self.metrics.watch_restarts.labels(self.resource, "expired").inc()
                self.resource_version = None
                delay = random.uniform(0, self.tuning.relist_jitter)  # noqa: S311 - jitter, not crypto
                log.info("%s watch expired (410), relisting in %.2fs", self.resource, delay)
                await asyncio.sleep(delay)
            except WatchStalled:
                self.metrics.watch_restarts.labels(self.resource, "inactivity").inc()
                log.warning("%s watch silent for %.0fs, restarting it", self.resource, self.tuning.inactivity)
            except ApiStatusError as exc:
                if exc.code == 410:
                    self.resource_version = None
                self.metrics.watch_restarts.labels(self.resource, f"error_{exc.code}").inc()
                delay = self._backoff.next(exc.retry_after)
                log.warning("%s list/watch failed (%s), retrying in %.2fs", self.resource, exc, delay)
                await asyncio.sleep(delay)
            except (ValueError, KeyError, OSError) as exc:  # a garbled line or an odd transport error
                delay = self._backoff.next()
                log.warning("%s watch broke (%r), retrying in %.2fs", self.resource, exc, delay)
                await asyncio.sleep(delay)

    async def _relist(self) -> None:
        items, rv = await self.client.list(self.path, self.params)
        self.on_list(items)
        self.resource_version = rv
        self.metrics.relists.labels(self.resource).inc()
        self.last_activity = time.monotonic()
        self._backoff.reset()
        self.synced.set()

    async def _watch(self) -> int:
        params = {
            **self.params,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.resource_version or "",
            "timeoutSeconds": str(max(1, int(jittered(self.tuning.timeout, self.tuning.jitter)))),
        }
        received = 0
        loop = asyncio.get_running_loop()
        async with self.client.stream(self.path, params) as response:
            try:
                async with asyncio.timeout(self.tuning.inactivity) as guard:
                    async for line in response.aiter_lines():
                        guard.reschedule(loop.time() + self.tuning.inactivity)
                        if line.strip():
                            received += 1
                            self._handle(json.loads(line))
            except TimeoutError:
                raise WatchStalled from None
        return received

    def _handle(self, event: Obj) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        self.last_activity = time.monotonic()
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == 410:
                raise Expired(obj.get("message", ""))
            raise ApiStatusError(code, str(obj.get("reason", "")), str(obj.get("message", "")))
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        self._backoff.reset()
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.on_event(kind, obj)
