"""The object store: one resourceVersion counter, a bounded change history and the watchers.

Pure data, no HTTP. Thread-safe (one lock) so a test thread can write while the server's event loop serves.
Stored objects are immutable by convention: every write stores a new dict and the old one stays valid in the
history, which is what lets watchers compare old and new objects against their selectors.
"""

from __future__ import annotations

import asyncio
import builtins
import copy
import json
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import errors
from .resources import ALL_RESOURCES, NAMESPACES, ResourceType
from .selectors import FieldSelector, LabelSelector

Obj = dict[str, Any]
Admit = Callable[[Obj | None, Obj | None], None]
"""Admission of one write: (old, new) as they would be stored (None for create/delete); raises to refuse."""
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(slots=True)
class Change:
    """One write in the history. `old` is the object before a MODIFIED/DELETED write."""

    rv: int
    resource: ResourceType
    type: str
    obj: Obj
    old: Obj | None
    _lines: dict[str, bytes] = field(default_factory=dict)

    def line(self, event_type: str, obj: Obj) -> bytes:
        """The watch line for this change, serialised once however many watchers receive it."""
        key = event_type if obj is self.obj else f"{event_type}/old"
        cached = self._lines.get(key)
        if cached is None:
            cached = self._lines[key] = dumps({"type": event_type, "object": obj}) + b"\n"
        return cached


class Watcher:
    """One watch stream's queue of changes; `None` in the queue means the stream must end."""

    def __init__(
        self,
        *,
        resource: ResourceType,
        namespace: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        since: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.resource = resource
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.seen_rv = since
        self.loop = loop
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue()

    def push(self, change: Change | None) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.queue.put_nowait(change)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, change)

    def matches(self, obj: Obj) -> bool:
        return self.labels.matches(obj["metadata"].get("labels")) and self.fields.matches(obj)

    def translate(self, change: Change) -> bytes | None:
        """The event this watcher sees: selectors turn a MODIFIED into ADDED/DELETED at the boundary."""
        self.seen_rv = max(self.seen_rv, change.rv)
        new_ok = self.matches(change.obj)
        if change.type != "MODIFIED" or change.old is None:
            return change.line(change.type, change.obj) if new_ok else None
        old_ok = self.matches(change.old)
        if new_ok:
            return change.line("MODIFIED" if old_ok else "ADDED", change.obj)
        if not old_ok:
            return None
        # Stops matching: the real server sends DELETED with the last matching state at the new RV.
        last = {**change.old, "metadata": {**change.old["metadata"], "resourceVersion": str(change.rv)}}
        return change.line("DELETED", last)


class Store:
    """Objects of every served resource under one monotonically increasing resourceVersion."""

    def __init__(self, *, history_size: int = 1000, require_namespace: bool = True) -> None:
        self.history_size = history_size
        self.require_namespace = require_namespace
        self._lock = threading.RLock()
        self._rv = 0
        self._min_rv = 0  # watches may resume from any RV >= this
        self._history: deque[Change] = deque()
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {r.key: {} for r in ALL_RESOURCES}
        self._watchers: dict[str, set[Watcher]] = {r.key: set() for r in ALL_RESOURCES}

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def oldest_resumable_rv(self) -> int:
        return self._min_rv

    def _record(self, res: ResourceType, event_type: str, obj: Obj, old: Obj | None) -> None:
        change = Change(self._rv, res, event_type, obj, old)
        self._history.append(change)
        while len(self._history) > self.history_size:
            self._min_rv = self._history.popleft().rv
        ns = obj["metadata"].get("namespace")
        for w in self._watchers[res.key]:
            if w.namespace is None or w.namespace == ns:
                w.push(change)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    # -- reads -------------------------------------------------------------------------------------------

    def get(self, res: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self._objects[res.key].get((namespace or "", name))
        if obj is None:
            raise errors.not_found(res, name)
        return obj

    def list(
        self,
        res: ResourceType,
        namespace: str | None = None,
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
    ) -> tuple[list[Obj], int]:
        """Matching objects sorted by namespace/name, and the list resourceVersion."""
        with self._lock:
            items = [
                obj
                for (ns, _), obj in sorted(self._objects[res.key].items(), key=lambda kv: kv[0])
                if (namespace is None or ns == namespace)
                and (labels is None or labels.matches(obj["metadata"].get("labels")))
                and (fields is None or fields.matches(obj))
            ]
            return items, self._rv

    # -- writes ------------------------------------------------------------------------------------------

    def create(
        self, res: ResourceType, namespace: str | None, obj: Obj, *, admit: Admit | None = None
    ) -> Obj:
        """Store a new object (taking ownership of `obj`); fills uid, RV, timestamps, generation."""
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        with self._lock:
            name = meta.get("name") or ""
            if not name:
                prefix = meta.get("generateName")
                if not prefix:
                    raise errors.invalid(
                        res, "", "metadata.name", "Required value: name or generateName is required"
                    )
                name = prefix + "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
            if res.namespaced:
                if not namespace:
                    raise errors.bad_request(
                        "the server could not find the requested resource (namespace missing)"
                    )
                if self.require_namespace and ("", namespace) not in self._objects[NAMESPACES.key]:
                    raise errors.not_found(NAMESPACES, namespace)
            key = (namespace or "", name)
            bucket = self._objects[res.key]
            obj["kind"] = res.kind
            obj["apiVersion"] = res.api_version
            meta["name"] = name
            if res.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            meta["generation"] = 1
            meta.pop("deletionTimestamp", None)
            self._default(res, obj)
            if admit is not None:
                admit(None, obj)  # before the name conflict, as on the real server (storage comes last)
            if key in bucket:
                raise errors.already_exists(res, name)
            meta["resourceVersion"] = self._next_rv()
            bucket[key] = obj
            self._record(res, "ADDED", obj, None)
            return obj

    @staticmethod
    def _default(res: ResourceType, obj: Obj) -> None:
        if res.kind == "Pod":
            obj.setdefault("spec", {})
            status = obj.setdefault("status", {})
            status.setdefault("phase", "Pending")
        elif res.kind == "Namespace":
            obj.setdefault("spec", {})
            obj.setdefault("status", {})
            obj["status"].setdefault("phase", "Active")

    def update(
        self,
        res: ResourceType,
        namespace: str | None,
        name: str,
        obj: Obj,
        *,
        subresource: str | None = None,
        admit: Admit | None = None,
    ) -> Obj:
        """Replace an object (PUT). A non-empty metadata.resourceVersion is a precondition (409 if stale)."""
        with self._lock:
            old = self.get(res, namespace, name)
            meta = obj.get("metadata")
            if not isinstance(meta, dict):
                meta = obj["metadata"] = {}
            if meta.get("name", name) != name:
                raise errors.bad_request(
                    f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
                )
            if res.namespaced and meta.get("namespace", namespace) != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            rv = meta.get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise errors.conflict(res, name)
            return self._replace(res, old, obj, subresource, admit)

    def mutate(
        self,
        res: ResourceType,
        namespace: str | None,
        name: str,
        fn: Callable[[Obj], Obj],
        *,
        subresource: str | None = None,
        admit: Admit | None = None,
    ) -> Obj:
        """Read-modify-write under the lock (PATCH). `fn` must return a new dict and not mutate its input.

        A resourceVersion in the result that differs from the current one is a failed precondition, as for
        a patch that carries metadata.resourceVersion on the real server.
        """
        with self._lock:
            old = self.get(res, namespace, name)
            new = fn(old)
            if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
                raise errors.invalid(
                    res, name, "metadata", "Required value: the patched object has no metadata"
                )
            if (
                new["metadata"].get("resourceVersion", old["metadata"]["resourceVersion"])
                != old["metadata"]["resourceVersion"]
            ):
                raise errors.conflict(res, name)
            if new["metadata"].get("name", name) != name:
                raise errors.invalid(res, name, "metadata.name", "Invalid value: field is immutable")
            return self._replace(res, old, new, subresource, admit)

    def _replace(
        self, res: ResourceType, old: Obj, new: Obj, subresource: str | None, admit: Admit | None = None
    ) -> Obj:
        old_meta = old["metadata"]
        if subresource == "status":
            # The status subresource changes only status (and metadata labels/annotations are ignored too).
            new = {**old, "status": new.get("status", {}), "metadata": dict(old_meta)}
        else:
            meta = dict(new.get("metadata") or {})
            for immutable in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                              "deletionGracePeriodSeconds", "generateName"):  # fmt: skip
                if immutable in old_meta:
                    meta[immutable] = old_meta[immutable]
                else:
                    meta.pop(immutable, None)
            new = {**new, "metadata": meta}
            if res.has_status:
                # The main resource ignores status changes when a status subresource exists.
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
        new["kind"] = res.kind
        new["apiVersion"] = res.api_version
        meta = new["metadata"]
        spec_changed = any(new.get(k) != old.get(k) for k in set(new) | set(old) if k not in _NON_SPEC)
        meta["generation"] = old_meta.get("generation", 1) + (1 if spec_changed else 0)
        if admit is not None:
            admit(old, new)  # as on the real server, also for a write that turns out to change nothing
        key = (meta.get("namespace", ""), meta["name"])
        if old_meta.get("deletionTimestamp") and not meta.get("finalizers"):
            meta["resourceVersion"] = self._next_rv()
            del self._objects[res.key][key]
            self._record(res, "DELETED", new, old)
            return new
        if {**new, "metadata": {**meta, "resourceVersion": old_meta["resourceVersion"]}} == old:
            return old  # a no-op write keeps the resourceVersion, like the real server
        meta["resourceVersion"] = self._next_rv()
        self._objects[res.key][key] = new
        self._record(res, "MODIFIED", new, old)
        return new

    def delete(
        self,
        res: ResourceType,
        namespace: str | None,
        name: str,
        *,
        preconditions: dict[str, Any] | None = None,
        admit: Admit | None = None,
    ) -> Obj:
        """Delete at once, or mark with deletionTimestamp while finalizers remain. Returns the final state."""
        with self._lock:
            old = self.get(res, namespace, name)
            if admit is not None:
                admit(old, None)
            meta = old["metadata"]
            pre = preconditions or {}
            if (pre.get("uid") and pre["uid"] != meta["uid"]) or (
                pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]
            ):
                raise errors.conflict(res, name)
            if res is NAMESPACES:
                for other in ALL_RESOURCES:
                    if other.namespaced:
                        for (ns, obj_name), obj in list(self._objects[other.key].items()):
                            if ns == name and not obj["metadata"].get("deletionTimestamp"):
                                self.delete(other, ns, obj_name)
            if meta.get("finalizers"):
                if meta.get("deletionTimestamp"):
                    return old
                new_meta = {
                    **meta,
                    "deletionTimestamp": now_rfc3339(),
                    "deletionGracePeriodSeconds": 0,
                    "resourceVersion": self._next_rv(),
                }
                new = {**old, "metadata": new_meta}
                self._objects[res.key][(namespace or "", name)] = new
                self._record(res, "MODIFIED", new, old)
                return new
            new = {**old, "metadata": {**meta, "resourceVersion": self._next_rv()}}
            del self._objects[res.key][(namespace or "", name)]
            self._record(res, "DELETED", new, old)
            return new

    # -- watch -------------------------------------------------------------------------------------------

    def watch(
        self,
        res: ResourceType,
        *,
        namespace: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        resource_version: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> Watcher:
        """Register a watcher. RV absent/"0": synthetic ADDED for current objects; else replay after RV.

        Raises 410 Expired if the RV is older than the history window.
        """
        with self._lock:
            if resource_version in (None, "", "0"):
                w = Watcher(
                    resource=res, namespace=namespace, labels=labels, fields=fields, since=self._rv, loop=loop
                )
                items, _ = self.list(res, namespace, labels, fields)
                for obj in items:
                    w.queue.put_nowait(
                        Change(int(obj["metadata"]["resourceVersion"]), res, "ADDED", obj, None)
                    )
            else:
                try:
                    since = int(resource_version or 0)
                except ValueError:
                    raise errors.bad_request(f"invalid resource version: {resource_version}") from None
                if since < self._min_rv:
                    raise errors.expired(f"too old resource version: {since} ({self._min_rv})")
                w = Watcher(
                    resource=res, namespace=namespace, labels=labels, fields=fields, since=since, loop=loop
                )
                for change in self._history:
                    if (
                        change.rv > since
                        and change.resource is res
                        and (namespace is None or change.obj["metadata"].get("namespace") == namespace)
                    ):
                        w.queue.put_nowait(change)
            self._watchers[res.key].add(w)
            return w

    def unwatch(self, watcher: Watcher) -> None:
        with self._lock:
            self._watchers[watcher.resource.key].discard(watcher)

    def watcher_count(self) -> int:
        with self._lock:
            return sum(len(ws) for ws in self._watchers.values())

    def drop_watchers(self) -> int:
        """End every watch stream now (clients see a clean end of stream and must re-watch)."""
        with self._lock:
            dropped = 0
            for ws in self._watchers.values():
                for w in ws:
                    w.push(None)
                    dropped += 1
                ws.clear()
            return dropped

    def compact(self) -> None:
        """Forget the history: every resourceVersion handed out so far answers 410 Expired to a watch.

        The counter moves on by one so that even the newest RV a client holds is older than the window.
        """
        with self._lock:
            self._history.clear()
            self._rv += 1
            self._min_rv = self._rv

    # -- convenience for tests (copies, so callers cannot corrupt the store) ---------------------------

    def objects(self, res: ResourceType, namespace: str | None = None) -> builtins.list[Obj]:
        return copy.deepcopy(self.list(res, namespace)[0])

    def seed(self, res: ResourceType, objs: Iterable[Obj]) -> builtins.list[Obj]:
        return [
            copy.deepcopy(self.create(res, o.get("metadata", {}).get("namespace"), copy.deepcopy(o)))
            for o in objs
        ]


_NON_SPEC = frozenset({"metadata", "status", "kind", "apiVersion"})
