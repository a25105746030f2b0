"""The response cache's Redis store on a real Redis: the byte bound holds across writers
(replicas), the oldest entries go first, expired entries are dropped, and its keys expire."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from service.config.redis import redis_client
from service.config.settings import RedisSettings
from service.response_cache.store import ENTRY_OVERHEAD_BYTES, NO_ROOM, STORED, RedisStore

pytestmark = pytest.mark.integration


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[tuple[list[RedisStore], aioredis.Redis]]:
    """Four stores on four clients (as four replicas would be) over one prefix, and a direct client."""
    rs = RedisSettings(url=redis_url, key_prefix=f"t-{uuid.uuid4().hex[:8]}")
    raw = [redis_client(rs) for _ in range(4)]
    direct = aioredis.Redis.from_url(redis_url)
    yield [RedisStore(c, rs.key_prefix) for c in raw], direct
    for c in raw:
        await c.aclose()
    await direct.aclose()


async def _held(store: RedisStore, direct: aioredis.Redis) -> tuple[int, int, int]:
    """(the counter, what the entries really take by the same rule, entries)."""
    entries = await direct.hgetall(store.entries_key)
    real = sum(len(v) + ENTRY_OVERHEAD_BYTES for v in entries.values())
    return int(await direct.get(store.keys[3]) or 0), real, len(entries)


async def test_the_bound_holds_and_the_oldest_entries_are_evicted(
    clients: tuple[list[RedisStore], aioredis.Redis],
) -> None:
    (store, *_), direct = clients
    cap = 10 * (1000 + ENTRY_OVERHEAD_BYTES)
    now = time.time()
    for i in range(30):
        put = await store.put(f"k{i}", bytes(1000), now + i / 1000, now + 3600, cap)
        assert put.result == STORED
        assert put.held_bytes <= cap
    counted, real, n = await _held(store, direct)
    assert counted == real <= cap
    assert n == 10
    assert [await store.get(f"k{i}") is not None for i in range(30)] == [False] * 20 + [True] * 10
    put = await store.put("big", bytes(3000), now + 1, now + 3600, cap)
    assert put.evicted == 3, "room for 3000 bytes: the three oldest go"
    assert await store.get("k20") is None
    assert await store.get("k23") is not None
    assert (await store.put("huge", bytes(cap), now + 2, now + 3600, cap)).result == NO_ROOM
    counted, real, n = await _held(store, direct)
    assert counted == real <= cap
    assert n == 8, "an entry no eviction can make room for evicts nothing"


async def test_the_bound_holds_across_concurrent_writers(
    clients: tuple[list[RedisStore], aioredis.Redis],
) -> None:
    stores, direct = clients
    cap = 64 * 1024
    rng = random.Random(3)

    async def writer(w: int, store: RedisStore) -> None:
        for i in range(150):
            now = time.time()
            put = await store.put(f"w{w}-{i}", bytes(rng.randint(10, 4000)), now, now + 3600, cap)
            assert put.held_bytes <= cap

    await asyncio.gather(*(writer(w, s) for w, s in enumerate(stores)))
    counted, real, n = await _held(stores[0], direct)
    assert counted == real
    assert real <= cap
    assert n > 10
    # SAMPLES 0: every field counted (the default samples 5 and extrapolates, off by a third here)
    memory = int(await direct.memory_usage(stores[0].entries_key, samples=0) or 0)
    assert memory <= 1.25 * cap, f"the entries hash takes {memory} bytes for a {cap}-byte bound"


async def test_expired_entries_are_dropped_by_the_next_write_and_the_keys_expire(
    clients: tuple[list[RedisStore], aioredis.Redis],
) -> None:
    (store, *_), direct = clients
    now = time.time()
    for i in range(5):
        await store.put(f"old{i}", bytes(500), now - 100, now - 1, 10**6)  # already expired
    await store.put("fresh", bytes(500), now, now + 30, 10**6)
    counted, real, n = await _held(store, direct)
    assert n == 1
    assert counted == real == 500 + ENTRY_OVERHEAD_BYTES
    for key in store.keys:
        ttl_ms = await direct.pttl(key)
        assert 30_000 < ttl_ms <= 90_000, f"{key}: the longest entry's TTL and a minute, not {ttl_ms}"


async def test_a_write_replaces_an_entry_under_the_same_key(
    clients: tuple[list[RedisStore], aioredis.Redis],
) -> None:
    (store, *_), direct = clients
    now = time.time()
    await store.put("k", b"first", now, now + 60, 10**6)
    await store.put("k", b"second!", now, now + 60, 10**6)
    assert await store.get("k") == b"second!"
    counted, real, n = await _held(store, direct)
    assert (counted, real, n) == (7 + ENTRY_OVERHEAD_BYTES, 7 + ENTRY_OVERHEAD_BYTES, 1)


async def test_the_counter_keeps_the_longest_ttl_after_a_shorter_write(
    clients: tuple[list[RedisStore], aioredis.Redis],
) -> None:
    """A write with a short TTL after one with a long TTL must not shorten the byte counter's
    TTL below the entries': the counter would expire first, restart at 0 with the entries
    still there, and the bound would no longer hold."""
    (store, *_), direct = clients
    now = time.time()
    await store.put("long", bytes(500), now, now + 3600, 10**6)
    await store.put("short", bytes(500), now, now + 1, 10**6)
    entries_ttl = await direct.pttl(store.entries_key)
    assert entries_ttl > 3_600_000
    for key in store.keys:
        assert await direct.pttl(key) >= entries_ttl - 1_000, f"{key} expires before the entries"
