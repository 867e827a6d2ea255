"""The Kubernetes client: lightkube for configuration and auth; every request and body handled here.

Every answer is read bounded and parsed by `wire` (lightkube's own client decodes answers unchecked: a
`{}` or HTML page answering a patch raised out of it). lightkube's watch API cannot send
allowWatchBookmarks, silently re-watches from "now" after 410 Gone when asked to retry, and keeps no read
timeout on its streams. The Informer below owns the whole list-then-watch protocol instead, on an httpx
client built by lightkube from the same KubeConfig (same TLS and bearer-token handling, including
service-account token files re-read after a 401), and hands raw JSON objects to the caches so the relist
diff and the pure selection see exactly what the API server sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import quote

import httpx2 as httpx
from lightkube.config.client_adapter import AsyncClient as _adapter_client
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig, SingleConfig

from ..errors import ControllerError
from .backoff import ApiHealth, Backoff, jittered
from .cache import Obj
from .config import WatchTuning
from .metrics import Metrics
from .wire import (
    BadResponse,
    TooLarge,
    bounded_body,
    bounded_lines,
    parse_event,
    parse_list,
    parse_written,
    show,
)

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 10.0
MAX_ERROR_BYTES = 64 << 10
"""An error answer is a Status of a few hundred bytes; more of it is not read."""
DEFAULT_REQUIRED = ("name", "uid", "resourceVersion")
MIN_STREAM_LIFETIME = 5.0
"""A watch stream that ends sooner did not prove the server healthy: consecutive short streams back off."""
PROBE_MAX = 0.5
"""Retry cap while the server is unreachable or in its RBAC grace window: a refused connection costs the
server nothing, and a new pod must be seen within a second of the server answering again."""


class ApiStatusError(ControllerError):
    """An API request that failed: HTTP code (0 when no response arrived), reason, and Retry-After."""

    def __init__(self, code: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.retry_after = retry_after


class WatchStalled(ControllerError):
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
        str(status.get("message", show(body[:200]))),
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


def _raw(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive; identity only (asked for), so no small body inflates while read."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadResponse(f"the body is {show(encoding)}-encoded although identity was asked for")
    return response.aiter_raw()


class KubeClient:
    """Every request and every body of the controller: bodies are read bounded and parsed by `wire`."""

    def __init__(self, config: SingleConfig, metrics: Metrics) -> None:
        self.metrics = metrics
        self.health = ApiHealth()
        self._http: httpx.AsyncClient = _adapter_client(
            config, ConnectionParams(timeout=httpx.Timeout(REQUEST_TIMEOUT))
        )
        self._http.headers["Accept-Encoding"] = "identity"

    async def close(self) -> None:
        await self._http.aclose()

    def _count(self, code: int) -> None:
        self.metrics.api_errors.labels(str(code)).inc()
        if code == 0:
            self.health.unreachable()
        else:
            self.health.answered(ok=False)

    async def _request(self, method: str, path: str, what: str, **kwargs: Any) -> tuple[int, bytes]:
        """Status and body of a successful request (bounded); ApiStatusError for a failed one."""
        try:
            async with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    raise await self._failure(response, what)
                return response.status_code, await bounded_body(_raw(response), what)
        except httpx.HTTPError as exc:
            self._count(0)
            raise ApiStatusError(0, type(exc).__name__, str(exc) or repr(exc)) from exc

    async def _failure(self, response: httpx.Response, what: str) -> ApiStatusError:
        """An error status, counted, with what its (bounded) body says."""
        self._count(response.status_code)
        try:
            body = await bounded_body(_raw(response), what, MAX_ERROR_BYTES)
        except BadResponse:
            body = b""
        return status_error(response.status_code, body, response.headers)

    def _bad_answer(self) -> None:
        self.metrics.api_errors.labels("bad_response").inc()
        self.health.answered(ok=False)

    async def list(
        self, path: str, params: dict[str, str], required: Sequence[str] = DEFAULT_REQUIRED
    ) -> tuple[list[Obj], str]:
        """Items and resourceVersion of a list; BadResponse for a body that is not a Kubernetes list."""
        _, body = await self._request("GET", path, "list body", params=params)
        self.health.answered(ok=True)
        return parse_list(body, required)

    async def node_exists(self, name: str) -> bool | None:
        """Whether the Node object is there; None when the answer is not a yes or no (403, outage)."""
        try:  # the status is the answer: the body is never read, so no size of it costs memory
            async with self._http.stream("GET", f"/api/v1/nodes/{quote(name, safe='')}") as response:
                status = response.status_code
        except httpx.HTTPError:
            self._count(0)
            return None
        if status == 404:
            return False
        return True if status < 400 else None

    @contextlib.asynccontextmanager
    async def stream(self, path: str, params: dict[str, str]) -> AsyncIterator[AsyncIterator[bytes]]:
        """The lines of a watch, each bounded, with no read timeout (the Informer's watchdog replaces it)."""
        timeout = httpx.Timeout(REQUEST_TIMEOUT, read=None)
        try:
            async with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    raise await self._failure(response, "watch error")
                self.health.answered(ok=True)
                yield bounded_lines(_raw(response))
        except httpx.HTTPError as exc:
            self._count(0)
            raise ApiStatusError(0, type(exc).__name__, str(exc) or repr(exc)) from exc

    async def _write(self, method: str, path: str, what: str, body: dict[str, Any], ctype: str) -> str | None:
        """One write; the resourceVersion of the object the server answered with. A 2xx answer that is
        not an object is an ApiStatusError with its code and reason BadResponse (the caller retries)."""
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": ctype}
        code = 200  # a body too large to read came with a 2xx status
        try:
            code, answer = await self._request(method, path, what, content=data, headers=headers)
            version = parse_written(answer, what)
        except BadResponse as exc:
            self._bad_answer()
            raise ApiStatusError(code, "BadResponse", str(exc)) from None
        self.health.answered(ok=True)
        return version

    async def patch_pod_annotations(
        self, namespace: str, name: str, annotations: dict[str, str]
    ) -> str | None:
        """One JSON merge patch of metadata.annotations; the pod's resourceVersion after it."""
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        body = {"metadata": {"annotations": annotations}}
        return await self._write("PATCH", path, "pod patch answer", body, "application/merge-patch+json")

    async def create_event(self, event: dict[str, Any], attempts: int = 4) -> None:
        """Create a core/v1 Event, retrying 429/5xx/connection failures; AlreadyExists means recorded."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        namespace = (event.get("metadata") or {}).get("namespace") or "default"
        path = f"/api/v1/namespaces/{quote(str(namespace), safe='')}/events"
        for attempt in range(attempts):
            try:
                await self._write("POST", path, "Event answer", event, "application/json")
                return
            except ApiStatusError as error:
                if error.code == 409:
                    return
                if (error.code not in (0, 429) and error.code < 500) or attempt == attempts - 1:
                    raise
                await asyncio.sleep(backoff.next(error.retry_after))


class Expired(ControllerError):
    """410 Gone: the resourceVersion is older than the server's history; relist."""


class Informer:
    """List, then watch from the list's resourceVersion, forever; never loses a change, never dies.

    - 410 Gone (an ERROR event or an HTTP 410) → relist after a random delay, diff against the cache;
    - a failed request → jittered exponential backoff (Retry-After honoured), reset by the next success
      (a list, or a watch the server accepted); no answer at all, or a 403 in the RBAC grace window after
      an outage → retries capped at PROBE_MAX, cut short when any request of the client succeeds;
    - a stream that ends before MIN_STREAM_LIFETIME (cleanly or not; a 410 only right after a list) → its
      own backoff, reset only by a stream that lived that long, so a server closing every watch at once is
      not re-watched in a hot loop;
    - a body that is not the Kubernetes shape (wire.BadResponse), or a callback that fails on an object →
      logged, counted, retried like a failed request; the object is not applied and the resourceVersion
      does not move past it; a watch line over wire.MAX_LINE_BYTES (wire.TooLarge) ends the stream at once
      and relists, since resuming would meet the same line;
    - objects `accept` refuses (another node's pods from a server that ignored the fieldSelector) are
      dropped and counted, never handed on;
    - BOOKMARK events only move the resourceVersion (allowWatchBookmarks=true is always sent); a jittered
      server-side timeoutSeconds ends streams regularly, and a watchdog restarts a stream that delivered
      nothing for `inactivity` seconds (for a server that never sent a bookmark: for the requested
      timeout plus `inactivity`, since without a watch cache a quiet stream is silent for its whole life).

    `failing` holds the current failure, cleared by a good list or a stream that lived MIN_STREAM_LIFETIME;
    /readyz reports it.
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
        *,
        required: Sequence[str] = DEFAULT_REQUIRED,
        accept: Callable[[Obj], bool] | None = None,
    ) -> None:
        self.resource = resource
        self.client = client
        self.path = path
        self.params = params
        self.on_list = on_list
        self.on_event = on_event
        self.metrics = metrics
        self.tuning = tuning
        self.required = required
        self.accept = accept
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.last_activity = time.monotonic()
        self.failing: str | None = None
        self.bookmarks_seen = False
        self._failures = Backoff(initial=0.2, maximum=30.0)
        self._probe = Backoff(initial=0.1, maximum=PROBE_MAX)
        self._churn = Backoff(initial=0.2, maximum=30.0)
        self._streak = 0
        self._streak_started = 0.0
        self._stream_started: float | None = None
        self._from_list = False
        self._stream_after_list = False
        self._oversized = False

    async def run(self) -> None:
        while True:
            self._stream_started = None
            wake = False
            try:
                if self.resource_version is None:
                    await self._relist()
                await self._watch()
                self.metrics.watch_restarts.labels(self.resource, "closed").inc()
                delay = self._stream_over()
            except Expired as exc:
                self.metrics.watch_restarts.labels(self.resource, "expired").inc()
                self.resource_version = None
                if not self._stream_after_list:  # resuming an old version: the protocol, not churn
                    self._stream_started = None
                delay = max(self._relist_delay(), self._stream_over())
                log.info("%s watch expired (410: %s), relisting in %.2fs", self.resource, show(str(exc)),
                         delay)  # fmt: skip
            except WatchStalled:
                self.metrics.watch_restarts.labels(self.resource, "inactivity").inc()
                delay = self._stream_over()
                level = logging.WARNING if self.bookmarks_seen else logging.INFO
                log.log(level, "%s watch silent for too long, restarting it", self.resource)
            except ApiStatusError as exc:
                if exc.code == 410:
                    self.resource_version = None
                self.metrics.watch_restarts.labels(self.resource, f"error_{exc.code}").inc()
                delay, wake = self._failed(exc)
            except TooLarge as exc:  # the same stream would send it again: start over from a list
                self.resource_version = None
                self._too_large(exc)
                delay = max(self._failures.next(), self._stream_over())
            except BadResponse as exc:
                self._note_failure("bad_response", str(exc))
                delay = max(self._failures.next(), self._stream_over())
            except (OSError, httpx.HTTPError) as exc:  # transport trouble in the middle of a stream
                self._note_failure("unreachable", repr(exc))
                self.client.health.unreachable()
                delay, wake = self._outage(), True
            except Exception as exc:  # a callback failed on an object: never let the informer die
                log.exception("%s informer failed on the server's data", self.resource)
                self._note_failure("internal", f"{type(exc).__name__}: {exc}")
                delay = max(self._failures.next(), self._stream_over())
            await self._pause(delay, wake)

    # -- outcomes -------------------------------------------------------------------------------------

    def _failed(self, exc: ApiStatusError) -> tuple[float, bool]:
        """Delay after a failed request, and whether another request's success may cut it short."""
        health = self.client.health
        if exc.code == 410:
            log.info("%s: 410 Gone (%s), relisting", self.resource, show(str(exc)))
            return self._relist_delay(), False
        if exc.code == 0:
            self._note_failure("unreachable", str(exc))
            return self._outage(), True
        if exc.code == 403 and health.recovering():
            self._note_failure("http_403", str(exc))
            return max(self._probe.next(), self._stream_over()), True
        self._note_failure(f"http_{exc.code}", str(exc))
        return max(self._failures.next(exc.retry_after), self._stream_over()), False

    def _outage(self) -> float:
        """No answer at all: the streams that ended short were cut by the outage, not churn. Probe."""
        self._stream_started = None
        self._churn.reset()
        return self._probe.next()

    def _relist_delay(self) -> float:
        """Spread a fleet's relists after a compaction; after an outage the probes already spread them."""
        jitter = self.tuning.relist_jitter
        if self.client.health.recovering():
            jitter = min(jitter, PROBE_MAX / 2)
        return random.uniform(0, jitter)  # noqa: S311 - jitter, not crypto

    def _stream_over(self) -> float:
        """A watch stream (if one was accepted) ended: the churn delay it costs (none if it was proven)."""
        started, self._stream_started = self._stream_started, None
        if started is None or time.monotonic() - started >= MIN_STREAM_LIFETIME:
            return 0.0
        return self._churn.next()

    def _note_failure(self, reason: str, detail: str) -> None:
        self.metrics.informer_failures.labels(self.resource, reason).inc()
        self.failing = f"{reason}: {detail}"
        if self._streak == 0:
            self._streak_started = time.monotonic()
        self._streak += 1
        level = logging.WARNING if self._streak == 1 or self._streak % 50 == 0 else logging.DEBUG
        log.log(level, "%s list/watch failed (%s, %d in a row): %s", self.resource, reason, self._streak,
                show(detail))  # fmt: skip

    def _too_large(self, exc: TooLarge) -> None:
        """Counted each time; logged once until a watch stream lives long enough to prove the server well
        again (the relist in between succeeds, so the usual failure streak would restart every time)."""
        self.metrics.informer_failures.labels(self.resource, "too_large").inc()
        self.failing = f"too_large: {exc}"
        if not self._oversized:
            log.warning("%s: %s; dropped the stream, relisting with backoff", self.resource, exc)
        self._oversized = True

    def _request_ok(self) -> None:
        """A list or a watch the server accepted: the backoffs come down at once."""
        self._failures.reset()
        self._probe.reset()

    def _recovered(self) -> None:
        """A good list, or a stream that lived MIN_STREAM_LIFETIME: no longer failing (/readyz)."""
        if self._streak:
            log.info("%s list/watch works again after %d failures in %.1fs", self.resource, self._streak,
                     time.monotonic() - self._streak_started)  # fmt: skip
        self._streak = 0
        self.failing = None

    def _proven(self) -> None:
        self._churn.reset()
        self._oversized = False
        self._recovered()

    async def _pause(self, delay: float, wake: bool) -> None:
        if delay <= 0:
            return
        if not wake:
            await asyncio.sleep(delay)
        elif await self.client.health.sleep_until_success(delay):
            await asyncio.sleep(random.uniform(0, 0.05))  # noqa: S311 - do not all retry in the same instant

    # -- protocol -------------------------------------------------------------------------------------

    async def _relist(self) -> None:
        items, rv = await self.client.list(self.path, self.params, self.required)
        self._request_ok()
        self.on_list(self._accepted(items))
        self._recovered()
        self.resource_version = rv
        self._from_list = True
        self.metrics.relists.labels(self.resource).inc()
        self.last_activity = time.monotonic()
        self.synced.set()

    def _accepted(self, items: list[Obj]) -> list[Obj]:
        if self.accept is None:
            return items
        kept = [item for item in items if self.accept(item)]
        if len(kept) < len(items):
            self._foreign(len(items) - len(kept))
        return kept

    def _foreign(self, count: int) -> None:
        self.metrics.foreign_objects.labels(self.resource).inc(count)
        log.warning("%s: the server sent %d objects outside the requested selector %s; dropped",
                    self.resource, count, show(self.params))  # fmt: skip

    def _watchdog_limit(self, timeout: int) -> float:
        if self.bookmarks_seen:
            return self.tuning.inactivity
        return timeout + self.tuning.inactivity

    async def _watch(self) -> None:
        timeout = max(1, int(jittered(self.tuning.timeout, self.tuning.jitter)))
        params = {
            **self.params,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.resource_version or "",
            "timeoutSeconds": str(timeout),
        }
        loop = asyncio.get_running_loop()
        async with self.client.stream(self.path, params) as lines:
            self._stream_started = time.monotonic()
            self._stream_after_list, self._from_list = self._from_list, False
            self._request_ok()
            proof = loop.call_later(MIN_STREAM_LIFETIME, self._proven)
            limit = self._watchdog_limit(timeout)
            try:
                async with asyncio.timeout(limit) as guard:
                    async for line in lines:
                        if line.strip():
                            self._handle(*parse_event(line, self.required))
                            limit = self._watchdog_limit(timeout)
                        guard.reschedule(loop.time() + limit)
            except TimeoutError:
                raise WatchStalled("nothing, not even a bookmark, arrived for the inactivity limit") from None
            finally:
                proof.cancel()

    def _handle(self, kind: str, obj: Obj) -> None:
        self.last_activity = time.monotonic()
        if kind == "ERROR":
            code = obj.get("code")
            code = code if isinstance(code, int) else 0
            if code == 410:
                raise Expired(str(obj.get("message", "")))
            raise ApiStatusError(code, str(obj.get("reason", "")), str(obj.get("message", "")))
        rv = str(obj["metadata"]["resourceVersion"])
        if kind == "BOOKMARK":
            self.bookmarks_seen = True
        elif self.accept is not None and not self.accept(obj):
            self._foreign(1)
        else:
            self.on_event(kind, obj)
        self.resource_version = rv
