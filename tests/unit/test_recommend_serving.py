"""The result cache (in-process and Redis) and the scoring batcher."""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

from aimesh_recommend.cache import Cached, LocalCache, RedisCache, build_cache
from tests.conftest import require

VALUE = Cached(["a", "b"], [2.0, 1.0], 0)


async def test_local_cache_expires_and_invalidates() -> None:
    now = [0.0]
    cache = LocalCache(ttl_s=10, size=2, clock=lambda: now[0])
    await cache.put("users/a", "v1", VALUE)
    await cache.put("users/a", "v2", VALUE)
    assert await cache.get("users/a", "v1") == VALUE
    now[0] = 10.0
    assert await cache.get("users/a", "v1") is None
    await cache.put("users/a", "v1", VALUE)
    await cache.invalidate(["users/a"])
    assert await cache.get("users/a", "v1") is None
    for user in ("users/b", "users/c", "users/d"):  # least recently used goes first
        await cache.put(user, "v1", VALUE)
    assert await cache.get("users/b", "v1") is None
    assert await cache.get("users/d", "v1") == VALUE


def test_cache_off_and_choice() -> None:
    assert type(build_cache("", 0, 10)).__name__ == "NoCache"
    assert isinstance(build_cache("", 5, 10), LocalCache)


# The suite's Redis; CI points it elsewhere with AIMESH_TEST_REDIS_URL.
REDIS_URL = os.environ.get("AIMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_up(url: str) -> bool:
    parsed = urlsplit(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 6379), timeout=0.5).close()
    except OSError:
        return False
    return True


async def test_redis_cache_against_a_real_redis() -> None:
    require(_redis_up(REDIS_URL), f"a Redis at {REDIS_URL}")
    cache = RedisCache(REDIS_URL, ttl_s=5, prefix=f"test:{uuid.uuid4().hex}:")
    try:
        await cache.put("users/a", "v1:m:0", VALUE)
        await cache.put("users/a", "v2:m:0", VALUE)
        assert await cache.get("users/a", "v1:m:0") == VALUE
        await cache.invalidate(["users/a"])  # every version of the user at once
        assert await cache.get("users/a", "v1:m:0") is None
        assert await cache.get("users/a", "v2:m:0") is None
    finally:
        await cache.close()


async def test_unreachable_redis_is_a_miss_not_an_error() -> None:
    cache = RedisCache("redis://127.0.0.1:1/0", ttl_s=5)
    await cache.put("users/a", "k", VALUE)
    assert await cache.get("users/a", "k") is None
    await cache.invalidate(["users/a"])
    await cache.close()
