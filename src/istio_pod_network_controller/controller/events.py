"""core/v1 Events about pods (and the controller's own Node), and the dedupe that keeps a crash-looping
condition from flooding the API.

A Warning is emitted once per (pod UID, reason, message): repeating the identical warning says nothing new
and every copy is an API write. Its name is derived from that triple, so after a controller restart the
same Warning is refused by the API server as AlreadyExists instead of being stored twice. Normal events
mark one-off transitions and are always sent.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from ..errors import public_message

COMPONENT: Final = "istio-pod-network-controller"
NORMAL: Final = "Normal"
WARNING: Final = "Warning"

# Reasons
INITIALIZED: Final = "Initialized"
REPAIRED: Final = "Repaired"
RECONFIGURED: Final = "Reconfigured"
REINITIALIZED: Final = "Reinitialized"
FOREIGN_NETNS: Final = "ForeignNetworkNamespace"
INVALID_CONFIG: Final = "InvalidInterceptionConfig"
HOST_NETWORK_SKIPPED: Final = "HostNetworkSkipped"
NETNS_NOT_FOUND: Final = "NetworkNamespaceNotFound"
APPLY_FAILED: Final = "InterceptionFailed"
CAPTURE_KEPT: Final = "CaptureKept"
CAPTURE_ON_NODE: Final = "CaptureRulesOnNode"
"""Warning on the Node: our rules were found (and removed) in the node's own network namespace."""

log = logging.getLogger(__name__)
_seq = itertools.count()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodRef(Protocol):
    """What an Event names about its pod (a PodView is one)."""

    @property
    def uid(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def resource_version(self) -> str: ...


def public_text(exc: BaseException) -> str:
    """The one place an error becomes Event text (tenant-readable): the error's public sentence, never the
    tool output, host PIDs or raw tenant bytes its detail may carry (those go to the log)."""
    return public_message(exc)


def _suffix(event_type: str, identity: str) -> str:
    """A Warning's name is a digest of what it says (a restart repeats it as AlreadyExists); others unique."""
    if event_type == WARNING:
        return hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{time.time_ns():x}{next(_seq) % 1000:03d}"


def _event(
    involved: dict[str, str], name: str, namespace: str, event_type: str, reason: str, message: str, node: str
) -> dict[str, Any]:
    """The one core/v1 Event body, whatever object it is about; reported by this node's controller."""
    stamp = _now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": message[:1024],
        "type": event_type,
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT,
        "reportingInstance": node,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def build_event(pod: PodRef, event_type: str, reason: str, message: str, node: str) -> dict[str, Any]:
    """A core/v1 Event whose involvedObject pins the pod by uid and resourceVersion."""
    involved = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod.name,
        "namespace": pod.namespace,
        "uid": pod.uid,
        "resourceVersion": pod.resource_version,
    }
    name = f"{pod.name}.{_suffix(event_type, f'{pod.uid}|{reason}|{message}')}"
    return _event(involved, name, pod.namespace, event_type, reason, message, node)


def build_node_warning(node: str, reason: str, message: str) -> dict[str, Any]:
    """A Warning about the controller's own Node, found by `kubectl describe node` (uid = name, as the
    kubelet does); its name is a digest of node and message, so a restart repeats it as AlreadyExists."""
    involved = {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node}
    name = f"{node}.{_suffix(WARNING, f'{node}|{message}')}"
    return _event(involved, name, "default", WARNING, reason, message, node)


class EventRecorder:
    """Sends Events in the background (a reconcile never waits on one) with Warning dedupe."""

    def __init__(self, node: str, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.node = node
        self._send = send
        self._warned: dict[str, set[tuple[str, str]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, pod: PodRef, event_type: str, reason: str, message: str) -> bool:
        """Queue one Event; False when it is a Warning already sent for this pod."""
        if event_type == WARNING:
            seen = self._warned.setdefault(pod.uid, set())
            if (reason, message) in seen:
                return False
            seen.add((reason, message))
        task = asyncio.get_running_loop().create_task(
            self._deliver(build_event(pod, event_type, reason, message, self.node))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _deliver(self, event: dict[str, Any]) -> None:
        try:
            await self._send(event)
        except Exception as exc:  # an Event is best effort; the pod's state is the truth
            log.warning(
                "event %s not recorded: %s",
                event["reason"],
                exc,
                extra={"namespace": event["metadata"]["namespace"], "pod": event["involvedObject"]["name"]},
            )

    def forget(self, uid: str) -> None:
        self._warned.pop(uid, None)

    async def flush(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
