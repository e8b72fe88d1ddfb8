"""Per-(user, model version) result cache with a TTL, dropped on a new interaction.

In-process by default; Redis when AIMESH_REDIS_URL is set, so every replica
sees an invalidation. In Redis a user's entries share one hash, one field per
version and view, so a new interaction drops them all with one DEL. A cache
that fails is a miss, never a failed request.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cached:
    items: list[str]
    scores: list[float]
    fallback_reason: int  # FallbackReason value; 0 when the model answered

    def encode(self, stored_at: float) -> str:
        return json.dumps([self.items, self.scores, self.fallback_reason, stored_at])

    @classmethod
    def decode(cls, raw: str | bytes) -> tuple[Cached, float]:
        items, scores, reason, stored_at = json.loads(raw)
        return cls(list(items), list(scores), int(reason)), float(stored_at)


class ResultCache(Protocol):
    async def get(self, user: str, key: str) -> Cached | None: ...
    async def put(self, user: str, key: str, value: Cached) -> None: ...
    async def invalidate(self, users: Iterable[str]) -> None: ...
    async def close(self) -> None: ...


class NoCache:
    async def get(self, user: str, key: str) -> Cached | None:
        return None

    async def put(self, user: str, key: str, value: Cached) -> None:
        return None

    async def invalidate(self, users: Iterable[str]) -> None:
        return None

    async def close(self) -> None:
        return None


class LocalCache:
    """LRU over users, each holding its entries by key."""

    def __init__(
        self, ttl_s: float, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._size = size
        self._clock = clock
        self._users: OrderedDict[str, dict[str, tuple[float, Cached]]] = OrderedDict()

    async def get(self, user: str, key: str) -> Cached | None:
        entries = self._users.get(user)
        entry = None if entries is None else entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry[0] >= self._ttl_s:
            del entries[key]  # type: ignore[union-attr]
            return None
        self._users.move_to_end(user)
        return entry[1]

    async def put(self, user: str, key: str, value: Cached) -> None:
        self._users.setdefault(user, {})[key] = (self._clock(), value)
        self._users.move_to_end(user)
        while len(self._users) > self._size:
            self._users.popitem(last=False)

    async def invalidate(self, users: Iterable[str]) -> None:
        for user in users:
            self._users.pop(user, None)

    async def close(self) -> None:
        self._users.clear()


class RedisCache:
    def __init__(self, url: str, ttl_s: float, prefix: str = "aimesh:recommend:") -> None:
        import redis.asyncio as redis

        self._redis = redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._ttl_s = ttl_s
        self._prefix = prefix
        self._errors = (redis.RedisError, OSError)

    def _key(self, user: str) -> str:
        return self._prefix + user

    async def get(self, user: str, key: str) -> Cached | None:
        try:
            raw = await self._redis.hget(self._key(user), key)
        except self._errors as error:
            log.warning("redis cache get failed: %s", error)
            return None
        if raw is None:
            return None
        value, stored_at = Cached.decode(raw)
        # The hash's expiry is refreshed by every put, so each field checks its own age.
        return value if time.time() - stored_at < self._ttl_s else None

    async def put(self, user: str, key: str, value: Cached) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(self._key(user), key, value.encode(time.time()))
                pipe.expire(self._key(user), max(1, round(self._ttl_s)))
                await pipe.execute()
        except self._errors as error:
            log.warning("redis cache put failed: %s", error)

    async def invalidate(self, users: Iterable[str]) -> None:
        keys = [self._key(user) for user in set(users)]
        if not keys:
            return
        try:
            await self._redis.delete(*keys)
        except self._errors as error:
            log.warning("redis cache invalidation failed: %s", error)

    async def close(self) -> None:
        await self._redis.aclose()


def build_cache(redis_url: str, ttl_s: float, size: int) -> ResultCache:
    if ttl_s <= 0:
        return NoCache()
    if redis_url:
        return RedisCache(redis_url, ttl_s)
    return LocalCache(ttl_s, size)
