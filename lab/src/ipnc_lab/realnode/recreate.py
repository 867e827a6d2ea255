"""Sandbox recreation on the real node, timed honestly: the pause process is killed, the kubelet makes a new
sandbox and posts its IP; the moment that status update reaches a watch (in this process) is compared with the
moment Istio's rules are first seen in the new sandbox's namespace (polled every `interval`)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .kubeapi import KubeAPI, Obj
from .workloads import has_rules, sandbox_pid


@dataclass(slots=True)
class Recreation:
    pod: str
    old_ip: str
    old_pid: int
    new_ip: str = ""
    status_at: float | None = None
    """time.monotonic() when the status update with the new IP arrived"""
    rules_at: float | None = None
    """time.monotonic() when Istio's rules were first seen in the new sandbox"""
    new_pid: int | None = None
    polls: int = 0
    polling: float = 0.0
    """seconds spent polling for the rules: `polling / polls` bounds the resolution of `rules_at`"""

    @property
    def latency(self) -> float | None:
        """Seconds from the status update to rules in place (negative: the rules were there first)."""
        if self.status_at is None or self.rules_at is None:
            return None
        return self.rules_at - self.status_at


def recreate_sandboxes(
    api: KubeAPI, namespace: str, pods: list[Obj], *, timeout: float, interval: float = 0.01
) -> list[Recreation]:
    """Kill the pause process of every pod in `pods` (captured, running) and time the recreations."""
    runs = {}
    for pod in pods:
        pid = sandbox_pid(pod["metadata"]["uid"])
        if pid is None:
            raise RuntimeError(f"pod {pod['metadata']['name']} has no sandbox process")
        runs[pod["metadata"]["uid"]] = Recreation(pod["metadata"]["name"], pod["status"]["podIP"], pid)
    deadline = time.monotonic() + timeout
    version = api.get(f"/api/v1/namespaces/{namespace}/pods?limit=1")["metadata"]["resourceVersion"]
    events = api.watch_pods(namespace, deadline, resourceVersion=version, allowWatchBookmarks="false")

    def watch() -> None:
        for arrived, event in events:
            run = runs.get(event["object"]["metadata"].get("uid", ""))
            ip = event["object"].get("status", {}).get("podIP", "")
            if run is not None and run.status_at is None and ip and ip != run.old_ip:
                run.new_ip, run.status_at = ip, arrived
            if all(r.status_at is not None for r in runs.values()):
                return

    watcher = threading.Thread(target=watch, name="recreation-watch", daemon=True)
    watcher.start()
    for run in runs.values():
        os.kill(run.old_pid, signal.SIGKILL)
    for uid, run in _pending(runs, deadline, interval):
        began = time.monotonic()
        if run.new_pid is None:
            pid = sandbox_pid(uid)
            run.new_pid = pid if pid != run.old_pid else None
        if run.new_pid is not None and has_rules(run.new_pid):
            run.rules_at = time.monotonic()
        run.polls += 1
        run.polling += time.monotonic() - began
    watcher.join(max(0.0, deadline - time.monotonic()) + 5)
    return list(runs.values())


def _pending(
    runs: dict[str, Recreation], deadline: float, interval: float
) -> Iterator[tuple[str, Recreation]]:
    """(uid, run) for every run whose rules are not yet seen, round after round, until all are seen or
    `deadline`."""
    while time.monotonic() < deadline:
        waiting = [(uid, run) for uid, run in runs.items() if run.rules_at is None]
        if not waiting:
            return
        yield from waiting
        time.sleep(interval)
