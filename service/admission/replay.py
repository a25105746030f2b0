"""Replay protection: a request id seen again within the window is a replay.

The window is per partner: `replay_window_s`, by default twice
`signing.max_skew_s` (a signed request is acceptable from `max_skew_s` before
its timestamp to `max_skew_s` after; after that the timestamp check refuses it
anyway). It applies to every partner with `signing.required`, and to any
other partner with `dedupe: true`.

Every sighting remembers where the id was first seen: (topic, partition,
offset). The same record delivered again by Kafka (a crash before the commit,
a rebalance) has the same origin and is not a replay; a copy produced again
has a new offset and is.

Sightings live in a bounded, time-expiring in-process map and, when Redis is
configured, in Redis (`SET key origin NX PX window`, one Lua script), so they
hold across replicas and restarts. If Redis is down the local map still answers
(the gap: a replay to another replica during the outage); the shared Redis health
(`service/config/redis_health.py`) says when, and when it is back.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.config.redis_health import REDIS_ERRORS, RedisHealth
from service.config.settings import PartnerSettings

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 200_000

_CHECK_AND_SET = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return '' end
local first = redis.call('GET', KEYS[1])
if (not first) or first == ARGV[1] then return '' end
return first
"""


def replay_window_s(ps: PartnerSettings) -> float | None:
    """The partner's replay window in seconds, or None when replay protection is off for it."""
    if not (ps.signing.required or ps.dedupe):
        return None
    return ps.replay_window_s if ps.replay_window_s is not None else 2 * ps.signing.max_skew_s


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record was read: the identity of one delivery."""

    topic: str
    partition: int
    offset: int

    def encode(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"  # '/' never occurs in a topic name


class LocalReplayStore:
    """In-process sightings: oldest evicted beyond `max_entries`, each expiring after its window."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self._max = max_entries
        self._clock = clock
        self._seen: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._evicted_warned_at = -1e18

    def __len__(self) -> int:
        return len(self._seen)

    def lookup(self, partner_id: str, request_id: str) -> str | None:
        """Where the id was first seen, if within its window."""
        entry = self._seen.get((partner_id, request_id))
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def check_and_record(self, partner_id: str, request_id: str, origin: str, window_s: float) -> str | None:
        """None if new (now recorded) or the same delivery again; else the first origin."""
        first = self.lookup(partner_id, request_id)
        if first is not None:
            return None if first == origin else first
        self.record(partner_id, request_id, origin, window_s)
        return None

    def record(self, partner_id: str, request_id: str, origin: str, window_s: float) -> None:
        now = self._clock()
        key = (partner_id, request_id)
        self._seen[key] = (now + window_s, origin)
        self._seen.move_to_end(key)
        self._expire(now)

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            oldest = next(iter(seen.values()))
            if oldest[0] <= now:
                seen.popitem(last=False)
            elif len(seen) > self._max:
                seen.popitem(last=False)
                if now - self._evicted_warned_at > 60:
                    self._evicted_warned_at = now
                    log.warning(
                        "replay cache full: evicting unexpired request ids (raise "
                        "runtime.replay_cache_max_entries or configure redis)",
                        extra={"max_entries": self._max},
                    )
            else:
                return


class RedisReplayStore:
    """Sightings in Redis, shared by every replica: `{prefix}:replay:{partner}:{request_id}`
    (the prefix in braces: a Redis Cluster hash tag, as the other gateway keys)."""

    def __init__(self, redis: Any, key_prefix: str) -> None:
        self.redis = redis
        self._tag = "{" + key_prefix + "}"
        self._script = redis.register_script(_CHECK_AND_SET)

    async def check_and_record(
        self, partner_id: str, request_id: str, origin: str, window_s: float
    ) -> str | None:
        key = f"{self._tag}:replay:{partner_id}:{request_id}"
        window_ms = max(1, int(window_s * 1000))
        first = await self._script(keys=[key], args=[origin, window_ms])
        if isinstance(first, bytes):
            first = first.decode("utf-8", errors="replace")
        return str(first) or None


class ReplayGuard:
    """Local sightings first (no round trip for a replay to the same replica), then Redis."""

    def __init__(
        self,
        local: LocalReplayStore | None = None,
        shared: RedisReplayStore | None = None,
        health: RedisHealth | None = None,
    ):
        self.local = local or LocalReplayStore()
        self.shared = shared
        self._owns_health = health is None
        self.health = health or (RedisHealth(shared.redis) if shared is not None else None)

    async def aclose(self) -> None:
        """Stop the health probe this guard started (a health passed in belongs to its owner)."""
        if self._owns_health and self.health is not None:
            await self.health.aclose()

    @property
    def degraded(self) -> bool:
        """Redis is down: replays are checked on this replica only."""
        return self.health is not None and self.health.down

    async def first_seen(self, ps: PartnerSettings, request_id: str, origin: Origin) -> str | None:
        """None when the request may proceed; else where this request id was first seen."""
        window = replay_window_s(ps)
        if window is None:
            return None
        here = origin.encode()
        first = self.local.lookup(ps.id, request_id)
        if first is not None:
            return None if first == here else first
        if self.shared is not None and not self.degraded:
            try:
                first = await self.shared.check_and_record(ps.id, request_id, here, window)
            except REDIS_ERRORS as exc:  # this one checked here only (a slow call is not an outage)
                if self.health is not None:
                    self.health.failed(exc)
            else:
                if self.health is not None:
                    self.health.ok()
                self.local.record(ps.id, request_id, first or here, window)
                return first
        return self.local.check_and_record(ps.id, request_id, here, window)
