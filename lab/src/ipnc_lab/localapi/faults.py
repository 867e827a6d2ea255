"""Fault injection and the request log, driven from Python or over HTTP under /_emulator/."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


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


class Faults:
    """Faults the server applies to Kubernetes API requests (never to /_emulator/ requests)."""

    def __init__(self, drop_watches: Callable[[], int], compact: Callable[[], None]) -> None:
        self._drop_watches = drop_watches
        self._compact = compact
        self._lock = threading.Lock()
        self._failures: list[FailureRule] = []
        self.latency = 0.0
        self.paused = False

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

    def restart(self) -> None:
        """What clients see when the API server restarts: watches end and old resourceVersions are gone."""
        self._compact()
        self._drop_watches()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()
        self.latency = 0.0
        self.paused = False

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
            self.restart()
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
