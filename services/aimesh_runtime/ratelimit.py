"""Per-principal token buckets, held in memory."""

from __future__ import annotations

import time


class RateLimiter:
    """Allow `rate` requests a second per key, with bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_keys = max_keys
        # key -> [tokens, time of last refill]
        self._buckets: dict[str, list[float]] = {}

    def acquire(self, key: str) -> float:
        """Take one token; return 0 if allowed, else seconds until one is free."""
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._forget_idle(now)
            bucket = self._buckets[key] = [self._burst, now]
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self._rate

    def _forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled completely: forgetting them changes nothing."""
        full_after = self._burst / self._rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b[1] < full_after}
        if len(self._buckets) >= self._max_keys:  # all busy: drop the older half
            keep = sorted(self._buckets.items(), key=lambda item: item[1][1])[self._max_keys // 2 :]
            self._buckets = dict(keep)
