"""A work queue keyed by pod UID, in the spirit of client-go's workqueue.

A key is queued at most once however many events arrive (bursts coalesce), is never handed to two workers
at once (an event during processing re-queues it once processing ends), and can be scheduled for later;
a new event for a key waiting on a timer makes it ready at once.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..errors import ControllerError


class QueueShutDown(ControllerError):
    """get() after shutdown(): the worker should exit."""


class WorkQueue:
    def __init__(self) -> None:
        self._ready: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._flags: dict[str, set[str]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._wakeup = asyncio.Event()
        self._shutdown = False

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def depth(self) -> int:
        """Keys waiting (ready or dirty or on a timer): what the queue-depth gauge reports."""
        return len(self._queued | self._dirty | set(self._timers))

    def add(self, key: str, *flags: str) -> None:
        if self._shutdown:
            return
        if flags:
            self._flags.setdefault(key, set()).update(flags)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
            self._wakeup.set()

    def add_after(self, key: str, delay: float) -> None:
        """Queue key after delay seconds, unless it is queued sooner (keeps the earliest timer)."""
        if self._shutdown or key in self._queued:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        current = self._timers.get(key)
        if current is not None:
            if current.when() <= when:
                return
            current.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: str) -> None:
        """Drop any pending timer and flags for key (the pod is gone)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._flags.pop(key, None)

    def scheduled(self, key: str) -> bool:
        return key in self._timers

    async def get(self) -> tuple[str, frozenset[str]]:
        while not self._ready:
            if self._shutdown:
                raise QueueShutDown("the work queue was shut down")
            self._wakeup.clear()
            await self._wakeup.wait()
        key = self._ready.popleft()
        self._queued.discard(key)
        self._processing.add(key)
        return key, frozenset(self._flags.pop(key, ()))

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def shutdown(self) -> None:
        """Hand out no more work: waiting workers get QueueShutDown, timers are cancelled."""
        self._shutdown = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._ready.clear()
        self._queued.clear()
        self._wakeup.set()
