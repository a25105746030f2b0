"""Replay protection: a request id seen again while its first sighting holds is a replay.

**The clock.** Every time here is in the clock of the staleness check
(`signature.py`): the broker's append time when the request topic keeps it
(`message.timestamp.type=LogAppendTime`), else the gateway's wall clock when it
reads the record. That time is a record's `at` (unix ms). A sighting holds until

    expires = max(at + replay_window_s, valid_until)

where `valid_until` is the last `at` at which a copy of the record still passes
the signature check: its signed timestamp + `signing.max_skew_s` (for an
operator replay, its mark + `operator_replay.max_age_s`). Another record with
the same id whose `at` is not after `expires` is a replay, however long after
the first the gateway reads it (a paused partner, one deferred by its budget, a
lagging consumer): with LogAppendTime both `at`s are append times, so waiting
in the topic does not count. A copy appended later than that is stale anyway.

**Forgetting, by the same clock.** Each partner has a reading clock: the latest
`at` checked for it. A sighting is dropped once that clock has passed its
`expires` by `replay_window_s` more (the margin for partitions of one partner
read at different paces), never by the wall clock: while a partner's backlog
waits, its reading clock waits too, and its sightings stay.

The window applies to every partner with `signing.required`, and to any other
partner with `dedupe: true`; its default is twice `signing.max_skew_s`.

Every sighting remembers where the id was first seen: (topic, partition,
offset). The same record delivered again by Kafka (a crash before the commit,
a rebalance) has the same origin and is not a replay; a copy produced again
has a new offset and is.

Sightings live in a bounded in-process store and, when Redis is configured, in
Redis (one Lua script per check: a hash of sightings per partner, a sorted set
of when each may be dropped, the partner's reading clock), so they hold across
replicas and restarts. If Redis is down the local store still answers (the gap:
a replay to another replica during the outage); the shared Redis health
(`service/config/redis_health.py`) says when, and when it is back. If Redis comes back
empty (`service/config/redis_epoch.py`), every replica writes its local sightings back.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from service.config.redis_epoch import RedisEpoch, register
from service.config.redis_health import REDIS_ERRORS, RedisHealth
from service.config.settings import PartnerSettings
from service.telemetry.logs import Throttle

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 200_000
IDLE_EXPIRY_MS = 35 * 86_400_000
"""A partner's sightings in Redis go after this long without any check for it (a removed
partner); longer than a budget period a deferred partner may wait."""
FORGET_PER_CHECK = 100
"""Expired sightings a Redis check drops at most (each check adds at most one)."""

_CHECK_AND_SET = """
local clock = tonumber(redis.call('GET', KEYS[3])) or 0
local at = tonumber(ARGV[4])
if at > clock then clock = at end
redis.call('SET', KEYS[3], string.format('%d', clock), 'PX', ARGV[6])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', clock, 'LIMIT', 0, tonumber(ARGV[7]))
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
end
local first = redis.call('HGET', KEYS[1], ARGV[1])
if first then
  local origin, expires = string.match(first, '^(.*)|(%d+)$')
  if origin == ARGV[8] or (expires and at <= tonumber(expires)) then return first end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return ARGV[2]
"""

# KEYS = hash, drop set, clock; ARGV = clock, TTL ms, then (request id, sighting, drop at)...
_WRITE_BACK = """
local clock = tonumber(redis.call('GET', KEYS[3])) or 0
if tonumber(ARGV[1]) > clock then redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2]) end
for i = 3, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
_WRITE_BACK_CHUNK = 500


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


@dataclass(frozen=True, slots=True)
class Sighting:
    """Where a request id was first seen, and until when (`at`, unix ms) a copy is a replay."""

    origin: str
    expires_ms: int

    def encode(self) -> str:
        return f"{self.origin}|{self.expires_ms}"  # '|' never occurs in an origin

    @classmethod
    def decode(cls, raw: str) -> Sighting:
        origin, _, expires = raw.rpartition("|")
        return cls(origin, int(expires)) if origin and expires.isdigit() else cls(raw, 0)

    def answers(self, origin: str, at_ms: int) -> bool:
        """This sighting decides for a record from `origin` at `at_ms`: the same delivery
        again, or a replay while it holds (else it has expired: the record is new)."""
        return origin == self.origin or at_ms <= self.expires_ms

    def refuses(self, origin: str, at_ms: int) -> str | None:
        """The first origin when a record from `origin` read at `at_ms` is a replay of this one."""
        return self.origin if origin != self.origin and at_ms <= self.expires_ms else None


class _Partner:
    """One partner's sightings, what may be dropped when, and its reading clock."""

    __slots__ = ("clock_ms", "drops", "seen")

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Sighting, int]] = {}
        self.drops: list[tuple[int, str]] = []  # (drop at, request id): a heap; stale entries skipped
        self.clock_ms = 0

    def pop_first(self) -> bool:
        """Drop the sighting due first; False when none is left."""
        while self.drops:
            drop_at, rid = heapq.heappop(self.drops)
            entry = self.seen.get(rid)
            if entry is not None and entry[1] == drop_at:
                del self.seen[rid]
                return True
        return False


class LocalReplayStore:
    """In-process sightings, dropped by each partner's reading clock; at most `max_entries`
    (beyond, the largest partner's next-due sightings go first, with a warning)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._max = max_entries
        self._partners: dict[str, _Partner] = {}
        self._count = 0
        self._evicted_warning = Throttle()

    def __len__(self) -> int:
        return self._count

    def clock_ms(self, partner_id: str) -> int:
        """The partner's reading clock: the latest `at` checked for it (0: none yet)."""
        p = self._partners.get(partner_id)
        return 0 if p is None else p.clock_ms

    def observe(self, partner_id: str, at_ms: int) -> None:
        """A record of the partner is checked at `at_ms`: advance its clock, drop what is due."""
        p = self._partners.get(partner_id)
        if p is None:
            p = self._partners[partner_id] = _Partner()
        if at_ms > p.clock_ms:
            p.clock_ms = at_ms
        while p.drops and p.drops[0][0] <= p.clock_ms:
            self._count -= p.pop_first()

    def lookup(self, partner_id: str, request_id: str) -> Sighting | None:
        """The sighting held for the id, expired or not (`Sighting.refuses` decides)."""
        p = self._partners.get(partner_id)
        entry = None if p is None else p.seen.get(request_id)
        return None if entry is None else entry[0]

    def record(
        self, partner_id: str, request_id: str, sighting: Sighting, *, at_ms: int, keep_ms: int
    ) -> None:
        """Hold `sighting` until the partner's clock passes its expiry by `keep_ms`."""
        self.observe(partner_id, at_ms)
        p = self._partners[partner_id]
        drop_at = sighting.expires_ms + keep_ms
        self._count += request_id not in p.seen
        p.seen[request_id] = (sighting, drop_at)
        heapq.heappush(p.drops, (drop_at, request_id))
        if self._count > self._max:
            self._evict()

    def check_and_record(
        self, partner_id: str, request_id: str, origin: str, *, at_ms: int, expires_ms: int, keep_ms: int
    ) -> str | None:
        """None if new (now recorded) or the same delivery again; else the first origin."""
        self.observe(partner_id, at_ms)
        first = self.lookup(partner_id, request_id)
        if first is not None and first.answers(origin, at_ms):
            return first.refuses(origin, at_ms)
        self.record(partner_id, request_id, Sighting(origin, expires_ms), at_ms=at_ms, keep_ms=keep_ms)
        return None

    def held(self) -> Iterator[tuple[str, int, list[tuple[str, Sighting, int]]]]:
        """Per partner: its reading clock and its sightings (request id, sighting, drop at)."""
        for pid, p in list(self._partners.items()):  # checks go on while the rows are written
            yield pid, p.clock_ms, [(rid, s, drop_at) for rid, (s, drop_at) in p.seen.items()]

    def _evict(self) -> None:
        while self._count > self._max:
            largest = max(self._partners.values(), key=lambda p: len(p.seen))
            if not largest.pop_first():
                return
            self._count -= 1
        if self._evicted_warning.due():
            log.warning(
                "replay cache full: evicting unexpired request ids (raise "
                "runtime.replay_cache_max_entries or configure redis)",
                extra={"max_entries": self._max},
            )


class RedisReplayStore:
    """Sightings in Redis, shared by every replica, per partner: the hash
    `{prefix}:sightings:{partner}` (request id -> `origin|expires`), the sorted set
    `{prefix}:sightings:{partner}:drop` (when each may go, by the reading clock) and the
    reading clock `{prefix}:sightings:{partner}:clock` (the prefix in braces: a Redis
    Cluster hash tag, as the other gateway keys)."""

    def __init__(self, redis: Any, key_prefix: str, epoch: RedisEpoch | None = None) -> None:
        self.redis = redis
        self._tag = "{" + key_prefix + "}"
        self._script = register(redis, _CHECK_AND_SET, epoch)

    async def write_back(self, local: LocalReplayStore) -> int:
        """Redis lost its data: write this replica's sightings back, keeping any held there
        since (not a guarded script: it runs while the epoch is being replaced)."""
        script = self.redis.register_script(_WRITE_BACK)
        written = 0
        for pid, clock_ms, rows in local.held():
            for start in range(0, max(1, len(rows)), _WRITE_BACK_CHUNK):
                chunk = rows[start : start + _WRITE_BACK_CHUNK]
                args: list[str | int] = [clock_ms, IDLE_EXPIRY_MS]
                for rid, sighting, drop_at in chunk:
                    args += [rid, sighting.encode(), drop_at]
                await script(keys=self.keys(pid), args=args)
                written += len(chunk)
        return written

    def keys(self, partner_id: str) -> list[str]:
        base = f"{self._tag}:sightings:{partner_id}"
        return [base, f"{base}:drop", f"{base}:clock"]

    async def check_and_record(
        self, partner_id: str, request_id: str, sighting: Sighting, *, at_ms: int, keep_ms: int
    ) -> Sighting:
        """Record `sighting` unless one holds for the id at `at_ms` (or is of the same
        delivery); returns the sighting held afterwards."""
        held = await self._script(
            keys=self.keys(partner_id),
            args=[
                request_id,
                sighting.encode(),
                sighting.expires_ms,
                at_ms,
                sighting.expires_ms + keep_ms,
                IDLE_EXPIRY_MS,
                FORGET_PER_CHECK,
                sighting.origin,
            ],
        )
        if isinstance(held, bytes):
            held = held.decode("utf-8", errors="replace")
        return Sighting.decode(str(held))


class ReplayGuard:
    """Local sightings first (no round trip for a replay to the same replica), then Redis.

    `clock`: the wall clock, for records whose topic does not keep their append time."""

    def __init__(
        self,
        local: LocalReplayStore | None = None,
        shared: RedisReplayStore | None = None,
        health: RedisHealth | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.local = local or LocalReplayStore()
        self.shared = shared
        self._owns_health = health is None
        self.health = health or (RedisHealth(shared.redis) if shared is not None else None)
        self._clock = clock

    async def write_back(self) -> int:
        """Redis lost its data: write this replica's sightings back."""
        return 0 if self.shared is None else await self.shared.write_back(self.local)

    async def aclose(self) -> None:
        """Stop the health probe this guard started (a health passed in belongs to its owner)."""
        if self._owns_health and self.health is not None:
            await self.health.aclose()

    @property
    def degraded(self) -> bool:
        """Redis is down: replays are checked on this replica only."""
        return self.health is not None and self.health.down

    async def first_seen(
        self,
        ps: PartnerSettings,
        request_id: str,
        origin: Origin,
        *,
        appended_ms: int | None = None,
        valid_until_ms: int | None = None,
    ) -> str | None:
        """None when the request may proceed; else where this request id was first seen.

        `appended_ms`: the broker's append time of the record, if its topic keeps it (else
        `at` is now); `valid_until_ms`: the last `at` at which a copy passes the signature check."""
        window = replay_window_s(ps)
        if window is None:
            return None
        at = appended_ms if appended_ms is not None else int(self._clock() * 1000)
        keep = int(window * 1000)
        expires = at + keep if valid_until_ms is None else max(at + keep, valid_until_ms)
        here = origin.encode()
        self.local.observe(ps.id, at)
        first = self.local.lookup(ps.id, request_id)
        if first is not None and first.answers(here, at):
            return first.refuses(here, at)
        if self.shared is not None and not self.degraded:
            try:
                held = await self.shared.check_and_record(
                    ps.id, request_id, Sighting(here, expires), at_ms=at, keep_ms=keep
                )
            except REDIS_ERRORS as exc:  # this one checked here only (a slow call is not an outage)
                if self.health is not None:
                    self.health.failed(exc)
            else:
                if self.health is not None:
                    self.health.ok()
                self.local.record(ps.id, request_id, held, at_ms=at, keep_ms=keep)
                return None if held.origin == here else held.origin
        return self.local.check_and_record(
            ps.id, request_id, here, at_ms=at, expires_ms=expires, keep_ms=keep
        )
