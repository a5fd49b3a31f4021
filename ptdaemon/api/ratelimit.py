"""Token buckets: requests per token, and failed sign-ins per client address."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

# Failed authentications an address may make in a burst, and how fast that
# allowance comes back. Tokens are 256-bit, so this bounds noise and the
# cost of lookups rather than guessing.
AUTH_FAILURE_BURST: Final = 20
AUTH_FAILURE_RATE: Final = 1.0
MAX_KEYS: Final = 10_000


class Buckets:
    """One token bucket per key, all with the same rate and burst."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def wait(self, key: str) -> float:
        """Seconds until `key` may take one, without taking it (0: now)."""
        level = self._level(key, self.clock())
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def take(self, key: str) -> float:
        """Take one for `key`: 0 when there was one, else the seconds to wait."""
        now = self.clock()
        level = self._level(key, now)
        if level < 1:
            self._buckets[key] = (level, now)
            return (1 - level) / self.rate
        self._buckets[key] = (level - 1, now)
        if len(self._buckets) > self.max_keys:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        # A full bucket holds nothing a new one would not.
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimits:
    """The API's limits; a rate of 0 turns both off."""

    def __init__(self, rate_per_second: float, burst: int) -> None:
        self.enabled = rate_per_second > 0
        self.per_token = Buckets(rate_per_second or 1.0, burst)
        self.failures = Buckets(AUTH_FAILURE_RATE, AUTH_FAILURE_BURST)


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
