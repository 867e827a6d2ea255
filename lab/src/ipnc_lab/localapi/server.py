"""The HTTP face of the emulator: an aiohttp app speaking the Kubernetes REST protocol over the store."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import secrets
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from aiohttp import web

from . import admission, discovery, errors, kubeconfig, patch, protobuf
from .errors import ApiError
from .faults import Faults, RequestLog, RequestRecord
from .hostile import Hostile
from .rbac import ADMIN_RULES, NODE_NAME_KEY, Authorizer, Rule, User, forbidden_message, parse_rules
from .resources import (
    NAMESPACES,
    VALIDATING_ADMISSION_POLICIES,
    VALIDATING_ADMISSION_POLICY_BINDINGS,
    ResourceType,
    lookup,
)
from .selectors import FieldSelector, LabelSelector, SelectorError, parse_field_selector, parse_label_selector
from .store import Admit, Obj, Store, Watcher, dumps
from .tls import ServerCertificates, generate_certificates

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "True")
_ITEM_VERBS = {"PATCH": "patch", "PUT": "update", "DELETE": "delete", "GET": "get"}
_OPERATIONS = {
    "create": "CREATE", "update": "UPDATE", "patch": "UPDATE",
    "delete": "DELETE", "deletecollection": "DELETE",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed resource URL."""

    res: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_path(path: str) -> tuple[str, str, list[str]] | None:
    """`/api/v1/...` or `/apis/<group>/<version>/...` -> (group, version, rest segments)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        return "", parts[1], parts[2:]
    if len(parts) >= 3 and parts[0] == "apis":
        return parts[1], parts[2], parts[3:]
    return None


def resolve(group: str, version: str, rest: list[str]) -> Target:
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        candidate = lookup(group, version, rest[2])
        if candidate is not None and candidate.namespaced:
            namespace, rest = rest[1], rest[2:]
    not_found = ApiError(404, "NotFound", "the server could not find the requested resource")
    if not rest or len(rest) > 3:
        raise not_found
    res = lookup(group, version, rest[0])
    if res is None:
        raise not_found
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and not (sub == "status" and res.has_status):
        raise not_found
    if namespace is not None and not res.namespaced:
        raise not_found
    if res.namespaced and namespace is None and name is not None:
        raise not_found
    return Target(res, namespace, name, sub)


def _verb(method: str, target: Target, query: Mapping[str, str]) -> str:
    if target.name is None:
        verbs = {
            "GET": "watch" if query.get("watch") in _TRUE else "list",
            "POST": "create",
            "DELETE": "deletecollection",
        }
    else:
        verbs = _ITEM_VERBS
    verb = verbs.get(method)
    if verb is None:
        raise ApiError(
            405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
        )
    return verb


def _json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type="application/json", headers=headers)


def _error_response(err: ApiError) -> web.Response:
    return _json_response(err.status(), err.code, err.headers)


class LocalAPIServer:
    """An in-process Kubernetes API server for tests and the demo.

    Use `async with LocalAPIServer() as api:` (or `start_in_thread()` from synchronous code). It writes a
    kubeconfig for an admin user (`api.kubeconfig_path`) that kubectl and lightkube use unchanged.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = False,
        history_size: int = 1000,
        bookmark_interval: float = 60.0,
        require_namespace: bool = True,
        namespaces: Iterable[str] = ("default", "kube-system", "kube-public"),
        admin_user: str = "admin",
        admin_token: str | None = None,
        anonymous: bool | None = None,
        users: Iterable[User] = (),
        kubeconfig_path: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.bookmark_interval = bookmark_interval
        # kubectl (client-go) never sends a bearer token over plain http, so without TLS requests that carry
        # no credentials act as the admin unless told otherwise; a token that is sent must still be known.
        self.anonymous = (not tls) if anonymous is None else anonymous
        self.store = Store(history_size=history_size, require_namespace=require_namespace)
        self.faults = Faults(self.store.drop_watchers, self.store.compact, self._go_offline)
        self.requests = RequestLog()
        self.admission = admission.Admission(
            lambda: self.store.list(VALIDATING_ADMISSION_POLICIES)[0],
            lambda: self.store.list(VALIDATING_ADMISSION_POLICY_BINDINGS)[0],
            self._namespace_object,
        )
        self.auth = Authorizer()
        self.admin = User(admin_user, admin_token or secrets.token_hex(16), ADMIN_RULES)
        self.auth.add(self.admin)
        for user in users:
            self.auth.add(user)
        self._initial_namespaces = tuple(namespaces)
        self._requested_kubeconfig = kubeconfig_path
        self._workdir: Path | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._certs: ServerCertificates | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._outage: asyncio.Future[None] | None = None
        self.url = ""
        self.kubeconfig_path = Path()

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> LocalAPIServer:
        self._workdir = Path(tempfile.mkdtemp(prefix="localapi-"))
        for ns in self._initial_namespaces:
            with contextlib.suppress(ApiError):
                self.store.create(NAMESPACES, None, {"metadata": {"name": ns}})
        ssl_context = None
        if self.tls:
            self._certs = generate_certificates()
            ssl_context = self._certs.ssl_context(self._workdir)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/_emulator/{what}", self._emulator)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        self._ssl_context = ssl_context
        self._loop = asyncio.get_running_loop()
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ssl_context)
        await self._site.start()
        port = self._runner.addresses[0][1]
        self.port = port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{'https' if self.tls else 'http'}://{host}:{port}"
        self.kubeconfig_path = self.write_kubeconfig(
            self._requested_kubeconfig or self._workdir / "kubeconfig"
        )
        return self

    def _go_offline(self, seconds: float, back: Callable[[], None]) -> None:
        """Close the listening socket for `seconds` (new connections are refused), then reopen it."""
        if self._loop is None:
            raise RuntimeError("the emulator is not running")

        async def outage() -> None:
            if self._site is not None:
                await self._site.stop()
            await asyncio.sleep(seconds)
            if self._runner is None:
                return
            self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl_context)
            await self._site.start()
            back()

        def schedule() -> None:
            self._outage = asyncio.ensure_future(outage())

        self._loop.call_soon_threadsafe(schedule)

    async def stop(self) -> None:
        self.faults.resume()
        if self._outage is not None:
            self._outage.cancel()
        self.store.drop_watchers()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    async def __aenter__(self) -> LocalAPIServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def start_in_thread(self) -> ThreadedServer:
        """Serve from a background thread (own event loop) for synchronous callers; `.stop()` ends it."""
        return ThreadedServer(self)

    # -- users ------------------------------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        token: str,
        rules: Iterable[Rule | Mapping[str, Any]],
        *,
        groups: Iterable[str] = (),
        extra: Mapping[str, Iterable[str]] | None = None,
    ) -> User:
        """Add a user; rules are `Rule`s or dicts `{verbs, resources, apiGroups?, namespaces?}`.

        `extra` is the token's `userInfo.extra` (see `rbac.pod_bound_extra` for a pod's projected token).
        """
        user = User(
            name,
            token,
            parse_rules(rules),
            tuple(groups),
            {key: tuple(values) for key, values in (extra or {}).items()},
        )
        self.auth.add(user)
        return user

    def install_policies(self, objects: Iterable[Obj]) -> None:
        """Store ValidatingAdmissionPolicies and bindings (checked as on create), as an admin would."""
        kinds = {r.kind: r for r in (VALIDATING_ADMISSION_POLICIES, VALIDATING_ADMISSION_POLICY_BINDINGS)}
        for obj in objects:
            res = kinds.get(obj.get("kind", ""))
            if res is None or obj.get("apiVersion") != res.api_version:
                raise ValueError(
                    f"not an admission policy or binding: {obj.get('apiVersion')} {obj.get('kind')}"
                )
            admission.check_definition(res, obj)
            self.store.create(res, None, copy.deepcopy(obj))

    def revoke_token(self, token: str) -> None:
        self.auth.revoke(token)

    def write_kubeconfig(self, path: Path, user: User | None = None) -> Path:
        """A kubeconfig for `user` (default: the admin user)."""
        user = user or self.admin
        ca = self._certs.ca_pem if self._certs else None
        return kubeconfig.write(path, self.url, user.token, user=user.name, ca_pem=ca)

    @property
    def ca_pem(self) -> bytes | None:
        return self._certs.ca_pem if self._certs else None

    # -- HTTP -------------------------------------------------------------------------------------------

    async def _emulator(self, request: web.Request) -> web.StreamResponse:
        what = request.match_info["what"]
        try:
            if what == "faults":
                if request.method == "POST":
                    return _json_response(self.faults.apply(await request.json()))
                return _json_response(self.faults.state())
            if what == "requests":
                if request.method == "DELETE":
                    self.requests.clear()
                return _json_response([r.to_dict() for r in self.requests.records()])
            if what == "healthz":
                return _json_response(
                    {
                        "url": self.url,
                        "resourceVersion": self.store.resource_version,
                        "watchers": self.store.watcher_count(),
                    }
                )
        except (ValueError, TypeError) as exc:
            return _error_response(errors.bad_request(str(exc)))
        return _error_response(ApiError(404, "NotFound", f"unknown emulator endpoint {what!r}"))

    def _authenticate(self, request: web.Request) -> User:
        header = request.headers.get("Authorization", "")
        if not header:
            if self.anonymous:
                return self.admin
            raise ApiError(401, "Unauthorized", "Unauthorized")
        scheme, _, token = header.partition(" ")
        user = self.auth.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return user

    async def _apply_faults(self, verb: str, resource: str) -> None:
        while self.faults.paused:
            await asyncio.sleep(0.005)
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        rule = self.faults.take_failure(verb, resource)
        if rule is None:
            return
        if rule.status == 429:
            headers = {"Retry-After": str(rule.retry_after or 1)}
            raise ApiError(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
                details={"retryAfterSeconds": rule.retry_after or 1},
                headers=headers,
            )
        if rule.status == 503:
            raise ApiError(503, "ServiceUnavailable", "injected fault: service unavailable")
        raise ApiError(500, "InternalError", "Internal error occurred: injected fault")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.faults.offline:  # a connection kept alive from before the outage: cut, no answer
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)  # never sent: the connection is gone
        query = request.query
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=dict(query),
            verb=None,
            resource=None,
            subresource=None,
            namespace=None,
            name=None,
            user=None,
            time=time.time(),
        )
        self.requests.add(record)
        started = time.monotonic()
        try:
            response = await self._serve(request, record)
        except ApiError as err:
            response = _error_response(err)
        except Exception as exc:
            log.exception("handler failed for %s %s", request.method, request.path_qs)
            response = _error_response(ApiError(500, "InternalError", f"Internal error occurred: {exc!r}"))
        if record.status is None:
            record.status = response.status
        record.duration = time.monotonic() - started
        return response

    async def _serve(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        user = self._authenticate(request)
        record.user = user.name
        record.node = next(iter(user.extra.get(NODE_NAME_KEY, ())), None)
        path = request.path
        parsed = parse_path(path)
        if parsed is None or len(parsed[2]) == 0 or path.startswith("/apis/authorization.k8s.io/"):
            record.verb = "get" if request.method == "GET" else request.method.lower()
            await self._apply_faults(record.verb, "")
            return await self._non_resource(request, user, parsed)
        target = resolve(*parsed)
        query = request.query
        verb = _verb(request.method, target, query)
        resource = target.res.plural
        record.verb, record.resource = verb, resource
        record.subresource, record.namespace, record.name = target.subresource, target.namespace, target.name
        await self._apply_faults(verb, resource)
        full = f"{resource}/{target.subresource}" if target.subresource else resource
        rbac_syncing = self.faults.forbidding() and user is not self.admin
        if rbac_syncing or not self.auth.allowed(user, verb, target.res.group, full, target.namespace):
            message = forbidden_message(
                user.name,
                verb=verb,
                group=target.res.group,
                resource=resource,
                subresource=target.subresource,
                name=target.name,
                namespace=target.namespace,
            )
            details = {"kind": resource, **({"name": target.name} if target.name else {})}
            if target.res.group:
                details["group"] = target.res.group
            raise ApiError(403, "Forbidden", message, details=details)
        return await self._resource(request, record, verb, target, user)

    async def _non_resource(
        self, request: web.Request, user: User, parsed: tuple[str, str, list[str]] | None
    ) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if request.method == "POST" and path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews":
            hostile = self.faults.hostile
            if hostile.answers_write("selfsubjectaccessreviews") and hostile.write_body is not None:
                return web.Response(status=201, body=hostile.write_body, content_type=hostile.write_type)
            return self._access_review(user, await self._body(request))
        if request.method != "GET":
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        body: Any = None
        if path == "/version":
            body = discovery.version()
        elif path == "/api":
            body = discovery.core_versions(f"{request.host}")
        elif path == "/apis":
            body = discovery.group_list()
        elif path == "/openapi/v2":
            # kubectl validates manifests against this; a schema-less document makes it skip validation.
            return web.Response(body=discovery.EMPTY_OPENAPI_V2, content_type=discovery.OPENAPI_V2_PROTOBUF)
        elif path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        elif parsed is not None and parsed[0] == "" and path == f"/api/{parsed[1]}":
            body = discovery.resource_list("", parsed[1])
        elif path.startswith("/apis/"):
            parts = path.split("/")[2:]
            if len(parts) == 1:
                body = discovery.group(parts[0])
            elif len(parts) == 2:
                body = discovery.resource_list(parts[0], parts[1])
        if body is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return _json_response(body)

    def _access_review(self, user: User, body: Obj) -> web.StreamResponse:
        attrs = (body.get("spec") or {}).get("resourceAttributes") or {}
        resource = attrs.get("resource", "")
        if attrs.get("subresource"):
            resource = f"{resource}/{attrs['subresource']}"
        allowed = self.auth.allowed(
            user, attrs.get("verb", ""), attrs.get("group", ""), resource, attrs.get("namespace") or None
        )
        return _json_response(
            {
                **body,
                "status": {
                    "allowed": allowed,
                },
            },
            201,
        )

    @staticmethod
    async def _body(request: web.Request) -> Obj:
        ctype = request.content_type
        raw = await request.read()
        if ctype == protobuf.MEDIA_TYPE:
            try:
                return protobuf.decode(raw)
            except ValueError as exc:
                raise ApiError(415, "UnsupportedMediaType", str(exc)) from None
        try:
            if ctype in ("application/json", "application/octet-stream", ""):
                data = json.loads(raw)
            elif ctype in ("application/yaml", "application/x-yaml"):
                data = yaml.safe_load(raw)
            else:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types include: "
                    f"application/json, application/yaml (got {ctype!r})",
                )
        except (ValueError, yaml.YAMLError) as exc:
            raise errors.bad_request(f"the body of the request could not be decoded: {exc}") from None
        if not isinstance(data, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        return data

    def _check_kind(self, res: ResourceType, body: Obj) -> None:
        kind, api_version = body.get("kind"), body.get("apiVersion")
        if (kind and kind != res.kind) or (api_version and api_version != res.api_version):
            raise errors.bad_request(
                f"the API version in the data ({api_version}) or kind ({kind}) does not match the expected "
                f"{res.api_version} {res.kind}"
            )

    # -- admission ----------------------------------------------------------------------------------------

    def _namespace_object(self, name: str) -> Obj | None:
        try:
            return self.store.get(NAMESPACES, None, name)
        except ApiError:
            return None

    def _admitter(self, user: User, verb: str, target: Target, warnings: list[str]) -> Admit:
        """The admission step of one write, run by the store on the object exactly as it would be stored."""
        info = admission.UserInfo(user.name, user.groups, extra=user.extra)

        def admit(old: Obj | None, new: Obj | None) -> None:
            if new is not None and target.res in (
                VALIDATING_ADMISSION_POLICIES,
                VALIDATING_ADMISSION_POLICY_BINDINGS,
            ):
                admission.check_definition(target.res, new)
            meta = (new or old or {}).get("metadata") or {}
            request = admission.Request(
                operation=_OPERATIONS[verb],
                resource=target.res,
                subresource=target.subresource or "",
                namespace=target.namespace or "",
                name=str(meta.get("name") or target.name or ""),
                user=info,
                obj=new,
                old=old,
            )
            warnings.extend(self.admission.admit(request))

        return admit

    async def _resource(
        self, request: web.Request, record: RequestRecord, verb: str, target: Target, user: User
    ) -> web.StreamResponse:
        store, res, query = self.store, target.res, request.query
        ns, name = target.namespace, target.name
        warnings: list[str] = []
        admit = self._admitter(user, verb, target, warnings)

        def respond(body: Any, status: int = 200) -> web.Response:
            headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
            return _json_response(body, status, headers)

        hostile = self.faults.hostile
        if verb in ("create", "update", "patch", "delete") and hostile.answers_write(res.plural):
            status = 201 if verb == "create" else 200
            return web.Response(status=status, body=hostile.write_body, content_type=hostile.write_type)
        if verb in ("list", "watch", "deletecollection"):
            hostile = hostile if verb != "deletecollection" and hostile.applies(res.plural) else Hostile()
            wanted = {} if hostile.ignore_selectors else query
            try:
                labels = parse_label_selector(wanted.get("labelSelector"))
                fields = parse_field_selector(wanted.get("fieldSelector"), res.supports_field)
            except SelectorError as exc:
                raise errors.bad_request(f"unable to parse requirement: {exc}") from None
            if verb == "watch":
                return await self._watch(request, record, target, labels, fields, hostile)
            if hostile.list_body is not None:
                return web.Response(body=hostile.list_body, content_type="application/json")
            items, rv = store.list(res, ns, labels, fields)
            if verb == "deletecollection":
                items = [store.delete(res, ns, o["metadata"]["name"], admit=admit) for o in items]
                rv = store.resource_version
            return respond(
                {
                    "kind": f"{res.kind}List",
                    "apiVersion": res.api_version,
                    "metadata": {"resourceVersion": str(rv)},
                    "items": items,
                }
            )
        if verb == "create":
            if target.subresource:
                raise ApiError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            body = await self._body(request)
            self._check_kind(res, body)
            meta = body.get("metadata")
            if res.namespaced and isinstance(meta, dict) and meta.get("namespace") not in (None, "", ns):
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            return respond(store.create(res, ns, body, admit=admit), 201)
        name = name or ""
        if verb == "get":
            return _json_response(store.get(res, ns, name))
        if verb == "update":
            body = await self._body(request)
            self._check_kind(res, body)
            return respond(store.update(res, ns, name, body, subresource=target.subresource, admit=admit))
        if verb == "patch":
            return respond(await self._patch(request, target, name, admit))
        raw = await request.read()
        preconditions = None
        if raw.strip():
            options = await self._body(request)
            preconditions = options.get("preconditions")
        return respond(store.delete(res, ns, name, preconditions=preconditions, admit=admit))

    async def _patch(self, request: web.Request, target: Target, name: str, admit: Admit) -> Obj:
        ctype = request.content_type
        if ctype not in patch.SUPPORTED:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f"{', '.join(patch.SUPPORTED)}",
            )
        try:
            document = json.loads(await request.read())
        except ValueError as exc:
            raise errors.bad_request(f"the body of the request could not be decoded: {exc}") from None
        res = target.res

        def apply(current: Obj) -> Obj:
            try:
                result = patch.apply_patch(ctype, current, document)
            except patch.PatchFormatError as exc:
                raise errors.bad_request(str(exc)) from None
            except patch.PatchError as exc:
                raise ApiError(
                    422,
                    "Invalid",
                    f'{res.kind} "{name}" is invalid: {exc}',
                    details={"name": name, "kind": res.plural},
                ) from None
            if not isinstance(result, dict):
                raise errors.bad_request("the patched object is not a JSON object")
            return result

        return self.store.mutate(
            res, target.namespace, name, apply, subresource=target.subresource, admit=admit
        )

    async def _watch(
        self,
        request: web.Request,
        record: RequestRecord,
        target: Target,
        labels: LabelSelector,
        fields: FieldSelector,
        hostile: Hostile,
    ) -> web.StreamResponse:
        query = request.query
        res = target.res
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        except ValueError:
            raise errors.bad_request(f"invalid timeoutSeconds: {query['timeoutSeconds']}") from None
        bookmarks = query.get("allowWatchBookmarks") in _TRUE and self.faults.bookmarks
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        try:
            watcher = self.store.watch(
                res,
                namespace=target.namespace,
                labels=labels,
                fields=fields,
                resource_version=query.get("resourceVersion"),
                loop=loop,
            )
        except ApiError as err:
            if err.code != 410:
                raise
            await response.prepare(request)
            record.status = 200
            await response.write(dumps({"type": "ERROR", "object": err.status()}) + b"\n")
            await response.write_eof()
            return response
        try:
            await response.prepare(request)
            record.status = 200
            if await self._hostile_watch(response, watcher, hostile, target, labels, fields):
                return response
            deadline = loop.time() + timeout if timeout else None
            next_bookmark = loop.time() + self.bookmark_interval
            while True:
                now = loop.time()
                waits = [deadline - now] if deadline is not None else []
                if bookmarks:
                    waits.append(next_bookmark - now)
                try:
                    if waits:
                        change = await asyncio.wait_for(watcher.queue.get(), max(0.0, min(waits)))
                    else:
                        change = await watcher.queue.get()
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        break
                    mark = {"kind": res.kind, "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(watcher.seen_rv)}}  # fmt: skip
                    await response.write(dumps({"type": "BOOKMARK", "object": mark}) + b"\n")
                    next_bookmark = loop.time() + self.bookmark_interval
                    continue
                if change is None:
                    break
                line = watcher.translate(change)
                if line is not None:
                    await response.write(line)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        except asyncio.CancelledError:
            raise
        except Exception:
            # Headers are sent: the stream can only end. The client re-watches, as after any drop.
            log.exception("watch stream failed for %s", request.path_qs)
        finally:
            self.store.unwatch(watcher)
        return response

    async def _hostile_watch(
        self,
        response: web.StreamResponse,
        watcher: Watcher,
        hostile: Hostile,
        target: Target,
        labels: LabelSelector,
        fields: FieldSelector,
    ) -> bool:
        """Serve the stream the hostile way, if one is set; True when the stream was served."""
        res = target.res
        mark = {"kind": res.kind, "apiVersion": res.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version)}}  # fmt: skip
        if hostile.watch_lines is not None:
            for line in hostile.watch_lines:
                await response.write(line + b"\n")
        elif hostile.huge_line is not None:
            for chunk in hostile.huge_chunks():
                await response.write(chunk)
        elif hostile.instant_close == "BOOKMARK":
            await response.write(dumps({"type": "BOOKMARK", "object": mark}) + b"\n")
        elif hostile.instant_close == "MODIFIED":
            items, _ = self.store.list(res, target.namespace, labels, fields)
            if items:
                await response.write(dumps({"type": "MODIFIED", "object": items[0]}) + b"\n")
        elif hostile.stall:
            await response.write(dumps({"type": "BOOKMARK", "object": mark}) + b"\n")
            while await watcher.queue.get() is not None:
                pass  # changes are swallowed; only the end of the stream (drop_watches) ends it
        else:
            return False
        await response.write_eof()
        return True


class ThreadedServer:
    """A `LocalAPIServer` running on its own event loop in a daemon thread."""

    def __init__(self, api: LocalAPIServer) -> None:
        self.api = api
        self._loop = asyncio.new_event_loop()
        started: threading.Event = threading.Event()
        self._error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(api.start())
            except BaseException as exc:
                self._error = exc
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="localapi", daemon=True)
        self._thread.start()
        started.wait()
        if self._error is not None:
            self._thread.join()
            self._loop.close()
            raise self._error

    @property
    def url(self) -> str:
        return self.api.url

    @property
    def kubeconfig_path(self) -> Path:
        return self.api.kubeconfig_path

    @property
    def store(self) -> Store:
        return self.api.store

    @property
    def faults(self) -> Faults:
        return self.api.faults

    @property
    def requests(self) -> RequestLog:
        return self.api.requests

    def add_user(self, name: str, token: str, rules: Iterable[Rule | Mapping[str, Any]]) -> User:
        return self.api.add_user(name, token, rules)

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.api.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
