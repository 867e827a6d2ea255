"""aiohttp TLS server for AdmissionReview admission.k8s.io/v1: POST /mutate, GET /healthz, GET /readyz.

Every request gets an answer and none can crash the server: a body that is not an AdmissionReview v1 is a
400 with a plain-text reason; a body over MAX_BODY_BYTES is a 413 before any of it is parsed (or read, when
it announces its length), one whose JSON would cost more than MAX_JSON_VALUES Python objects a 400, one not
sent within BODY_TIMEOUT a 408; a review of something that is not a Pod CREATE is allowed unchanged; a pod
that cannot be rewritten is denied with the reason (code 400); an unexpected error is denied with code 500
and logged. The certificate and key are re-read when their files change (Secret rotation), for new
connections, without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from ...errors import RefusedInput
from ..injection import InjectionError, InjectOptions, rewrite_pod
from .listener import DEFAULT_LIMITS, Limits, Listener
from .patch import pod_patch

log = logging.getLogger(__name__)

ADMISSION_API: Final = "admission.k8s.io/v1"
MAX_BODY_BYTES: Final = 4 << 20
"""kube-apiserver refuses request bodies over 3 MiB (its --max-request-body-bytes default) and etcd objects
over 1.5 MiB; the webhook is registered for CREATE only, so a review carries one pod (oldObject is null)
plus the request's envelope: 4 MiB leaves room for what defaulting and managedFields add."""
MAX_JSON_VALUES: Final = 250_000
"""Objects, arrays and strings in one body, counted from its bytes before parsing (an overcount: brackets
and quotes inside strings count too). A real pod has a few thousand; each costs Python ~70 bytes at most,
so parsing stays under ~20 MiB however the body is shaped (8 MiB of `[[],[],...]` once took ~260 MiB)."""
BODY_TIMEOUT: Final = 10.0
"""Seconds to deliver a body once the headers are in: the chart's timeoutSeconds, the API server's own
deadline for the whole call (at most 30 s)."""
IDLE_TIMEOUT: Final = 15.0
"""Seconds a connection may sit idle, or take to send a request's headers, before it is closed."""
MAX_READING: Final = 4
"""Bodies read at once; others wait (within BODY_TIMEOUT) so trickled bodies cannot add up."""
OPTIONS_KEY: Final = web.AppKey("options", InjectOptions)
READING_KEY: Final = web.AppKey("reading", asyncio.Semaphore)
LISTENER_KEY: Final = web.AppKey("listener", Listener)


class BadReview(RefusedInput):
    """The body is not a usable AdmissionReview v1 (answered with HTTP 400)."""


@dataclass(slots=True)
class CertReloader:
    """An SSL context whose certificate chain is reloaded when the cert or key file changes."""

    cert_file: str
    key_file: str
    context: ssl.SSLContext
    _stamp: tuple[float, float, int, int] = (0.0, 0.0, 0, 0)
    loaded: bool = False

    @classmethod
    def create(cls, cert_file: str, key_file: str) -> CertReloader:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        reloader = cls(cert_file, key_file, context)
        reloader.reload(force=True)
        return reloader

    def _current_stamp(self) -> tuple[float, float, int, int]:
        cert, key = os.stat(self.cert_file), os.stat(self.key_file)
        return (cert.st_mtime, key.st_mtime, cert.st_ino, key.st_ino)

    def reload(self, *, force: bool = False) -> bool:
        """Load the pair if it changed; a bad new pair is logged and the old one kept (unless forced)."""
        try:
            stamp = self._current_stamp()
            if not force and stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            if force:
                raise
            log.warning("keeping the current certificate: reloading failed: %s", exc)
            return False
        self._stamp = stamp
        self.loaded = True
        log.info("loaded TLS certificate %s", self.cert_file)
        return True


TLS_KEY: Final = web.AppKey("tls", CertReloader)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BadReview(message)


def parse_review(body: bytes) -> Mapping[str, Any]:
    """The `request` of an AdmissionReview v1, checked just enough to answer it."""
    _require(len(body) <= MAX_BODY_BYTES, f"body is larger than {MAX_BODY_BYTES} bytes")
    values = body.count(b"{") + body.count(b"[") + body.count(b'"') // 2
    _require(values <= MAX_JSON_VALUES, f"body holds more than {MAX_JSON_VALUES} JSON values")
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadReview(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadReview("body is nested too deeply") from None
    _require(isinstance(review, dict), "body is not a JSON object")
    _require(review.get("kind") == "AdmissionReview", "kind must be AdmissionReview")
    _require(
        review.get("apiVersion") == ADMISSION_API,
        f"apiVersion must be {ADMISSION_API} (configure admissionReviewVersions: [v1])",
    )
    request = review.get("request")
    _require(isinstance(request, dict), "request is missing")
    uid = request.get("uid")
    _require(isinstance(uid, str) and bool(uid), "request.uid is missing")
    checked: Mapping[str, Any] = request
    return checked


def _response(uid: str, **fields: Any) -> dict[str, Any]:
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "response": {"uid": uid, **fields}}


def _deny(uid: str, code: int, message: str) -> dict[str, Any]:
    return _response(uid, allowed=False, status={"code": code, "message": message, "status": "Failure"})


def _is_pod_create(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind") or {}
    resource = request.get("resource") or {}
    return (
        isinstance(kind, dict)
        and isinstance(resource, dict)
        and kind.get("group", "") == ""
        and kind.get("kind") == "Pod"
        and resource.get("resource") == "pods"
        and not request.get("subResource")
        and request.get("operation") == "CREATE"
    )


def review_response(request: Mapping[str, Any], options: InjectOptions) -> dict[str, Any]:
    """The AdmissionReview answering one (already parsed) request."""
    uid = str(request["uid"])
    if not _is_pod_create(request):
        return _response(uid, allowed=True)
    pod = request.get("object")
    if not isinstance(pod, dict):
        return _deny(uid, 400, "request.object is not a Pod object")
    metadata = pod.get("metadata")
    spec = pod.get("spec")
    if metadata is not None and not isinstance(metadata, dict):
        return _deny(uid, 400, "pod metadata is not an object")
    if not isinstance(spec, dict):
        return _deny(uid, 400, "pod spec is missing or not an object")
    try:
        result = rewrite_pod(metadata, spec, options)
    except InjectionError as exc:
        return _deny(uid, 400, f"istio-pod-network-controller cannot rewrite this pod: {exc}")
    if not result.changed:
        return _response(uid, allowed=True)
    after = {**pod, "metadata": result.metadata, "spec": result.spec}
    patch = pod_patch(pod, after)
    fields: dict[str, Any] = {
        "allowed": True,
        "patchType": "JSONPatch",
        "patch": base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode(),
    }
    if result.warnings:
        fields["warnings"] = [f"istio-pod-network-controller: {w}" for w in result.warnings]
    name = (metadata or {}).get("name") or (metadata or {}).get("generateName", "?")
    log.info("rewrote pod %s/%s", request.get("namespace", "?"), name)
    return _response(uid, **fields)


def _refuse(status: int, text: str) -> web.Response:
    """An answer that closes the connection: whatever the client still sends is never read."""
    response = web.Response(status=status, text=text)
    response.force_close()
    return response


async def _read_body(request: web.Request) -> bytes | web.Response:
    """The body, or the answer refusing it: too large (413), too slow (408)."""
    announced = request.content_length
    if announced is not None and announced > MAX_BODY_BYTES:
        log.warning("refused a %d-byte body from %s (limit %d)", announced, request.remote, MAX_BODY_BYTES)
        return _refuse(413, f"body larger than {MAX_BODY_BYTES} bytes\n")
    try:
        async with asyncio.timeout(BODY_TIMEOUT), request.app[READING_KEY]:
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        log.warning("refused a body over %d bytes from %s", MAX_BODY_BYTES, request.remote)
        return _refuse(413, f"body larger than {MAX_BODY_BYTES} bytes\n")
    except TimeoutError:
        log.warning("refused a body not sent within %.0fs from %s", BODY_TIMEOUT, request.remote)
        return _refuse(408, f"body not sent within {BODY_TIMEOUT:.0f}s\n")


async def mutate(request: web.Request) -> web.Response:
    listener = request.app.get(LISTENER_KEY)
    connection = listener.request_started(request.transport) if listener is not None else None
    try:
        return await _mutate(request)
    finally:
        Listener.request_done(connection)


async def _mutate(request: web.Request) -> web.Response:
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        review = parse_review(body)
    except BadReview as exc:
        return web.Response(status=400, text=f"bad AdmissionReview: {exc}\n")
    try:
        answer = review_response(review, request.app[OPTIONS_KEY])
    except Exception:
        log.exception("unexpected error answering review %s", review.get("uid"))
        answer = _deny(str(review["uid"]), 500, "internal error in istio-pod-network-controller webhook")
    return web.json_response(answer)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    reloader = request.app.get(TLS_KEY)
    if reloader is not None and not reloader.loaded:
        return web.Response(status=503, text="no certificate loaded\n")
    return web.Response(text="ok\n")


def make_app(options: InjectOptions, reloader: CertReloader | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[OPTIONS_KEY] = options
    app[READING_KEY] = asyncio.Semaphore(MAX_READING)
    if reloader is not None:
        app[TLS_KEY] = reloader
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def _watch_certs(reloader: CertReloader, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        reloader.reload()


@contextlib.asynccontextmanager
async def serving(
    options: InjectOptions,
    host: str,
    port: int,
    cert_file: str,
    key_file: str,
    reload_interval: float = 30.0,
    limits: Limits = DEFAULT_LIMITS,
) -> AsyncIterator[tuple[web.AppRunner, int]]:
    """Run the webhook until the context exits; yields the runner and the bound port (0 picks one)."""
    reloader = CertReloader.create(cert_file, key_file)
    app = make_app(options, reloader)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_TIMEOUT)

    def handler() -> asyncio.Protocol:
        assert runner.server is not None  # noqa: S101 - set by setup(), before anything listens
        return runner.server()

    listener = Listener(handler, reloader.context, limits)
    app[LISTENER_KEY] = listener
    await runner.setup()
    server = await asyncio.get_running_loop().create_server(listener, host, port, reuse_address=True)
    bound = int(server.sockets[0].getsockname()[1]) if server.sockets else port
    watcher = asyncio.create_task(_watch_certs(reloader, reload_interval))
    try:
        yield runner, bound
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        server.close()
        await runner.cleanup()


async def serve_forever(
    options: InjectOptions,
    host: str,
    port: int,
    cert_file: str,
    key_file: str,
    reload_interval: float,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    async with serving(options, host, port, cert_file, key_file, reload_interval, limits) as (_runner, bound):
        log.info("webhook listening on https://%s:%d/mutate", host, bound)
        await asyncio.Event().wait()
