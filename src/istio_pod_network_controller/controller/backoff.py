"""Jittered exponential backoff, shared by every retry path (API calls, watches, per-pod retries)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


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
