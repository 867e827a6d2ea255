"""aiohttp TLS server for AdmissionReview admission.k8s.io/v1: POST /mutate, GET /healthz, GET /readyz.

Every request gets an answer and none can crash the server: a body that is not an AdmissionReview v1 is a
400 with a plain-text reason; a review of something that is not a Pod CREATE is allowed unchanged; a pod
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
from .patch import pod_patch

log = logging.getLogger(__name__)

ADMISSION_API: Final = "admission.k8s.io/v1"
MAX_BODY_BYTES: Final = 8 << 20
"""The API server caps an object at ~1.5 MiB; a review holds at most two copies (object, oldObject)."""
OPTIONS_KEY: Final = web.AppKey("options", InjectOptions)


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
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadReview(f"body is not JSON: {exc}") from None
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


async def mutate(request: web.Request) -> web.Response:
    try:
        body = await request.read()
        review = parse_review(body)
    except BadReview as exc:
        return web.Response(status=400, text=f"bad AdmissionReview: {exc}\n")
    except web.HTTPException:
        raise
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
) -> AsyncIterator[tuple[web.AppRunner, int]]:
    """Run the webhook until the context exits; yields the runner and the bound port (0 picks one)."""
    reloader = CertReloader.create(cert_file, key_file)
    runner = web.AppRunner(make_app(options, reloader), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=reloader.context)
    await site.start()
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    watcher = asyncio.create_task(_watch_certs(reloader, reload_interval))
    try:
        yield runner, bound
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await runner.cleanup()


async def serve_forever(
    options: InjectOptions, host: str, port: int, cert_file: str, key_file: str, reload_interval: float
) -> None:
    async with serving(options, host, port, cert_file, key_file, reload_interval) as (_runner, bound):
        log.info("webhook listening on https://%s:%d/mutate", host, bound)
        await asyncio.Event().wait()
