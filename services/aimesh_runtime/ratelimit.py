"""Per-principal token buckets, held in memory with least-recently-used eviction."""

from __future__ import annotations

import time
from collections import OrderedDict


class RateLimiter:
    """Allow `rate` requests a second per key, with bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_keys = max_keys
        # key -> (tokens, last refill time)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, key: str) -> float:
        """Take one token; return 0 if allowed, else seconds until one is free."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self._rate
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait
