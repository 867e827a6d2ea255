"""Fault injection and the request log, driven from Python or over HTTP under /_emulator/."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .hostile import Hostile

GoOffline = Callable[[float, Callable[[], None]], None]
"""Stop listening for `seconds`, then listen again and call the callback (the server provides it)."""


@dataclass(slots=True)
class FailureRule:
    """Fail the next `remaining` requests matching verb/resource (None = any) with `status`."""

    remaining: int
    status: int = 500
    verb: str | None = None
    resource: str | None = None
    retry_after: int | None = None

    def matches(self, verb: str, resource: str) -> bool:
        return (self.verb is None or self.verb == verb) and (
            self.resource is None or self.resource == resource
        )


@dataclass(slots=True)
class Restart:
    """One emulated kube-apiserver restart, in wall-clock seconds (`time.time()`, as the request log).

    `listening`: connections are accepted again; `rbac_ready`: requests are authorized again (before it,
    every non-admin request is 403, as while a real server's RBAC authorizer syncs).
    """

    began: float
    down: float
    rbac_delay: float
    listening: float | None = None
    rbac_ready: float | None = None


class Faults:
    """Faults the server applies to Kubernetes API requests (never to /_emulator/ requests)."""

    def __init__(
        self,
        drop_watches: Callable[[], int],
        compact: Callable[[], None],
        go_offline: GoOffline | None = None,
    ) -> None:
        self._drop_watches = drop_watches
        self._compact = compact
        self._go_offline = go_offline
        self._lock = threading.Lock()
        self._failures: list[FailureRule] = []
        self._forbid_until = 0.0
        self.latency = 0.0
        self.paused = False
        self.offline = False
        self.bookmarks = True
        self.hostile = Hostile()
        self.restarts: list[Restart] = []

    def drop_watches(self) -> int:
        return self._drop_watches()

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        verb: str | None = None,
        resource: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        if status not in (429, 500, 503):
            raise ValueError("status must be 429, 500 or 503")
        with self._lock:
            self._failures.append(FailureRule(count, status, verb, resource, retry_after))

    def set_latency(self, seconds: float) -> None:
        self.latency = max(0.0, seconds)

    def restart(self, down: float = 0.0, rbac_delay: float = 0.0) -> Restart:
        """What clients see when kube-apiserver restarts: watches end and every resourceVersion handed out
        is gone (410 on resume, as with the watch cache); for `down` seconds nothing listens (connections
        are refused); then for `rbac_delay` seconds every non-admin request is 403 Forbidden, although
        /readyz says ok. Returns the restart's record, whose times fill in as it happens."""
        record = Restart(time.time(), down, rbac_delay)
        self.restarts.append(record)
        self._compact()
        if down > 0:
            if self._go_offline is None:
                raise ValueError("this emulator cannot go offline")
            self.offline = True
            self._drop_watches()
            self._go_offline(down, lambda: self._listening(record))
        else:
            self._drop_watches()
            self._listening(record)
        return record

    def _listening(self, record: Restart) -> None:
        self._forbid_until = time.monotonic() + record.rbac_delay
        record.listening = time.time()
        record.rbac_ready = record.listening + record.rbac_delay
        self.offline = False

    def forbidding(self) -> bool:
        """Within a restart's RBAC window."""
        return time.monotonic() < self._forbid_until

    def set_bookmarks(self, enabled: bool) -> None:
        """False: no BOOKMARK events at all, as a kube-apiserver with `--watch-cache=false`."""
        self.bookmarks = enabled

    def set_hostile(self, hostile: Hostile) -> None:
        self.hostile = hostile

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()
        self.latency = 0.0
        self.paused = False
        self._forbid_until = 0.0
        self.bookmarks = True
        self.hostile = Hostile()

    def take_failure(self, verb: str, resource: str) -> FailureRule | None:
        with self._lock:
            for rule in self._failures:
                if rule.matches(verb, resource):
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._failures.remove(rule)
                    return rule
        return None

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "failures": [asdict(f) for f in self._failures],
                "latency": self.latency,
                "paused": self.paused,
                "offline": self.offline,
                "forbidding": self.forbidding(),
                "bookmarks": self.bookmarks,
                "hostile": self.hostile.describe(),
            }

    def apply(self, command: dict[str, Any]) -> dict[str, Any]:
        """The HTTP form: `{"action": "fail", "count": 2, "status": 429, "verb": "list", ...}`."""
        action = command.get("action")
        result: dict[str, Any] = {}
        if action == "drop_watches":
            result["dropped"] = self.drop_watches()
        elif action == "fail":
            self.fail_next(
                int(command.get("count", 1)),
                status=int(command.get("status", 500)),
                verb=command.get("verb"),
                resource=command.get("resource"),
                retry_after=command.get("retry_after"),
            )
        elif action == "latency":
            self.set_latency(float(command.get("seconds", 0)))
        elif action == "restart":
            restart = self.restart(float(command.get("down", 0)), float(command.get("rbac_delay", 0)))
            result["restart"] = asdict(restart)
        elif action == "bookmarks":
            self.set_bookmarks(bool(command.get("enabled", True)))
        elif action == "hostile":
            self.set_hostile(Hostile.from_command(command))
        elif action == "pause":
            self.pause()
        elif action == "resume":
            self.resume()
        elif action == "clear":
            self.clear()
        else:
            raise ValueError(f"unknown action {action!r}")
        return {**result, **self.state()}


@dataclass(slots=True)
class RequestRecord:
    """One Kubernetes API request. `status` is set when the response starts (watches: at the stream start)."""

    method: str
    path: str
    query: dict[str, str]
    verb: str | None
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    user: str | None
    time: float
    status: int | None = None
    duration: float | None = None
    node: str | None = None
    """The node the request's token is bound to (its userInfo.extra node-name), if any."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RequestLog:
    _records: list[RequestRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def count(
        self,
        *,
        verb: str | None = None,
        resource: str | None = None,
        name: str | None = None,
        namespace: str | None = None,
        status: int | None = None,
    ) -> int:
        return sum(
            1
            for r in self.records()
            if (verb is None or r.verb == verb)
            and (resource is None or r.resource == resource)
            and (name is None or r.name == name)
            and (namespace is None or r.namespace == namespace)
            and (status is None or r.status == status)
        )
