"""Jittered exponential backoff, shared by every retry path (API calls, watches, per-pod retries), and what
the client knows about the API server's reachability (ApiHealth), which shortens waits after an outage."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

RBAC_GRACE = 5.0
"""For this long after an unreachable API server answers again, a 403 is taken for its RBAC authorizer not
being synced yet (a restarting kube-apiserver answers 403 for 1-2 s) and retried at the probe rate."""


def jittered(value: float, fraction: float, rng: random.Random | None = None) -> float:
    """value ± fraction·value, uniformly: spreads timers so a fleet of nodes does not act in step."""
    return value * (1.0 + (rng or random).uniform(-fraction, fraction))


@dataclass(slots=True)
class Backoff:
    """Delays initial·factor^n capped at maximum, with "equal jitter" (half fixed, half random).

    The fixed half keeps a floor under the retry rate; the random half de-synchronises clients. A server's
    Retry-After raises the delay, never lowers it.
    """

    initial: float = 0.2
    maximum: float = 30.0
    factor: float = 2.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self, retry_after: float | None = None) -> float:
        base = min(self.maximum, self.initial * self.factor**self.attempts)
        self.attempts += 1
        delay = base / 2 + self.rng.uniform(0, base / 2)
        return max(delay, retry_after or 0.0)

    def reset(self) -> None:
        self.attempts = 0


class ApiHealth:
    """Reachability of the API server as every request of one client sees it.

    "Unreachable" means no HTTP answer at all (refused, reset, timed out); the first answer of any kind
    ends it and opens the RBAC grace window. Waiters that sleep out an outage wake as soon as any request
    of the client succeeds, so one informer's success brings the others back at once, and the callbacks
    given to `on_recovery` run once at the first success after an outage (retries waiting on a timer can
    go now instead of when their grown backoff ends).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.unreachable_since: float | None = None
        self.answered_at: float | None = None
        self._success = asyncio.Event()
        self._down = False
        self._on_recovery: list[Callable[[], None]] = []

    def on_recovery(self, callback: Callable[[], None]) -> None:
        self._on_recovery.append(callback)

    def unreachable(self) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = self._clock()
        self._down = True

    def answered(self, ok: bool) -> None:
        """An HTTP response arrived (`ok`: a 2xx)."""
        if self.unreachable_since is not None:
            self.unreachable_since = None
            self.answered_at = self._clock()
        if ok:
            self._success.set()
            self._success = asyncio.Event()
            if self._down:
                self._down = False
                for callback in self._on_recovery:
                    callback()

    def recovering(self) -> bool:
        """Within the RBAC grace window after an outage."""
        return self.answered_at is not None and self._clock() - self.answered_at < RBAC_GRACE

    async def sleep_until_success(self, delay: float) -> bool:
        """Sleep `delay` seconds, or less if a request succeeds meanwhile (then True)."""
        success = self._success
        try:
            await asyncio.wait_for(success.wait(), delay)
        except TimeoutError:
            return False
        return True
