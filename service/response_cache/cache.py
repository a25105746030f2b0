"""The front the pipeline calls: `lookup` after admission, `store` after a published answer.

- Only partners with `cache.enabled` take part; for the others `lookup` answers None and
  nothing is read or written.
- A **hit** is an entry under the request's key (`key.py`) that has not expired and is not
  older than the reading partner's `ttl_s`. The pipeline publishes it (`Pipeline._serve_cached`)
  without a fair turn, a limiter grant, a budget reservation, a claim or a call.
- **What is stored**: an answer published as a response (never a dead letter, never an error
  status, never a response that became `response_too_large`), whose `stop_reason` is in
  `CACHEABLE_STOP_REASONS`, and whose entry fits `max_entry_bytes`.
- **Redis down or slow**: a lookup that fails is a miss and that request stores nothing; while
  the shared `RedisHealth` says down, nothing is read or written (misses, counted
  `unavailable`). There is no local fallback beside Redis: a replica's own copy would serve
  what another replica evicted, and the bound would no longer hold across replicas.
- Neither call raises (cancellation aside): a fault of the cache is a miss, logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ClusterDownError, OutOfMemoryError, ReadOnlyError, ResponseError, TryAgainError

from service.admission.admit import Admitted
from service.config.redis_health import REDIS_ERRORS, RedisHealth
from service.config.settings import GatewaySettings
from service.contracts.outcomes import Timings, encode_response, utc_iso
from service.response_cache.entry import CorruptEntry, Entry, decode, encode
from service.response_cache.key import cache_key, scope_of
from service.response_cache.store import NO_ROOM, LocalStore, RedisStore, Store
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

REDIS_DOWN_RESPONSES = (ReadOnlyError, OutOfMemoryError, ClusterDownError, TryAgainError)
"""Errors Redis answers that mean it fails every caller, not just the cache's keys."""

CACHEABLE_STOP_REASONS = frozenset(
    {"end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"}
)
"""Answers worth serving again. `max_tokens` and `model_context_window_exceeded` are cut
short, but they are the whole answer to those params (a larger `max_tokens` is another key).
Not cached: `refusal` (a safety decision the next call may not repeat, and policy changes; it
must not be replayed to a partner for a whole TTL), `pause_turn` (a server-tool turn left to be
continued: not an answer), a missing or unknown stop reason."""


def has_tool_error(body: Mapping[str, Any]) -> bool:
    """The answer holds a server tool's error (`web_search_tool_result_error`, `web_fetch_...`,
    `code_execution_...`, `tool_search_...` with `unavailable`, `too_many_requests`, ...): a
    200 whose tool failed, often for a moment; replaying it for a whole TTL would serve an error."""
    content = body.get("content")
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, Mapping):
            continue
        kind, inner = block.get("type"), block.get("content")
        if isinstance(kind, str) and kind.endswith("_tool_result") and isinstance(inner, Mapping):
            inner_kind = inner.get("type")
            if isinstance(inner_kind, str) and inner_kind.endswith("_error"):
                return True
    return False


@dataclass(frozen=True, slots=True)
class Lookup:
    """A cache-enabled request's key, and what was found under it."""

    key: str
    partner_id: str
    ttl_s: float
    entry: Entry | None = None
    """The hit, if any."""
    storable: bool = True
    """False when Redis failed this request's lookup: store nothing for it either."""


class ResponseCache:
    def __init__(
        self,
        settings: GatewaySettings,
        store: Store,
        metrics: Metrics,
        *,
        health: RedisHealth | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = store
        self.shared = isinstance(store, RedisStore)
        self.health = health
        self.metrics = metrics
        self._clock = clock
        self.configure(settings)

    @classmethod
    def build(
        cls, settings: GatewaySettings, metrics: Metrics, redis: Any = None, health: RedisHealth | None = None
    ) -> ResponseCache:
        """On the gateway's Redis when it has one, else in process."""
        if redis is not None and settings.redis is not None:
            return cls(settings, RedisStore(redis, settings.redis.key_prefix), metrics, health=health)
        return cls(settings, LocalStore(), metrics)

    def configure(self, settings: GatewaySettings) -> None:
        """Take new settings (start, reload): partners' `cache`, sharing groups, bounds."""
        self.settings = settings.response_cache
        share = self.settings.share
        self._partners = {
            p.id: (scope_of(p.id, share), p.cache.ttl_s or self.settings.ttl_s)
            for p in settings.partners
            if p.cache.enabled
        }
        for pid in self._partners:  # zero samples: dashboards see 0, not "no data"
            for result in ("hit", "miss"):
                self.metrics.response_cache.labels(pid, result)
            self.metrics.response_cache_hit_latency.labels(pid)

    def enabled_for(self, partner_id: str) -> bool:
        """The partner has `cache.enabled`: its requests are looked up."""
        return partner_id in self._partners

    @property
    def degraded(self) -> bool:
        """Redis is down: every lookup is a miss and nothing is stored."""
        return self.shared and self.health is not None and self.health.down

    async def lookup(self, adm: Admitted) -> Lookup | None:
        """None when the partner's cache is off; else its key and the hit, if any."""
        pid = adm.partner.id
        scoped = self._partners.get(pid)
        if scoped is None:
            return None
        scope, ttl_s = scoped
        try:
            key = cache_key(scope, adm.params)
        except Exception:  # params came from JSON; a bug here must not stop the request
            log.exception("response cache key failed", extra={"partner": pid})
            self._count(pid, "unavailable")
            return None
        if self.degraded:
            self._count(pid, "unavailable")
            return Lookup(key, pid, ttl_s, storable=False)
        try:
            blob = await self.backend.get(key)
        except ResponseError as exc:
            self._response_error(pid, exc, "unavailable")
            return Lookup(key, pid, ttl_s, storable=False)
        except REDIS_ERRORS as exc:  # a miss, and this request stores nothing
            self._failed(exc)
            self._count(pid, "unavailable")
            return Lookup(key, pid, ttl_s, storable=False)
        except Exception:  # a fault of the cache is a miss, never a failed request
            log.exception("response cache lookup failed", extra={"partner": pid})
            self.metrics.internal_errors.labels(pid, "response_cache").inc()
            return Lookup(key, pid, ttl_s, storable=False)
        self._answered()
        entry = self._decode(pid, blob) if blob is not None else None
        if entry is None or not entry.fresh(self._clock(), ttl_s):
            self._count(pid, "miss")
            return Lookup(key, pid, ttl_s)
        self._count(pid, "hit")
        return Lookup(key, pid, ttl_s, entry)

    async def store(self, lookup: Lookup, body: Mapping[str, Any], upstream_request_id: str | None) -> None:
        """Keep a published answer for the next request with the same key. Never raises."""
        pid = lookup.partner_id
        try:
            await self._store(lookup, body, upstream_request_id)
        except ResponseError as exc:
            self._response_error(pid, exc, "skip_unavailable")
        except REDIS_ERRORS as exc:
            self._failed(exc)
            self._count(pid, "skip_unavailable")
        except Exception:  # after the outcome is published: a fault here must not stop the service
            log.exception("response cache store failed", extra={"partner": pid})
            self.metrics.internal_errors.labels(pid, "response_cache").inc()

    async def _store(self, lookup: Lookup, body: Mapping[str, Any], upstream_request_id: str | None) -> None:
        pid = lookup.partner_id
        if body.get("stop_reason") not in CACHEABLE_STOP_REASONS:
            self._count(pid, "skip_stop_reason")
            return
        if has_tool_error(body):
            self._count(pid, "skip_tool_error")
            return
        if not lookup.storable or self.degraded:
            self._count(pid, "skip_unavailable")
            return
        now = self._clock()
        entry = Entry(dict(body), upstream_request_id, now, now + lookup.ttl_s)
        blob = encode(entry, self.settings.compress_min_bytes)
        if len(blob) > self.settings.max_entry_bytes:
            self._count(pid, "skip_too_large")
            return
        max_bytes = self.settings.max_bytes if self.shared else self.settings.local_max_bytes
        put = await self.backend.put(lookup.key, blob, entry.stored_at, entry.expires_at, max_bytes)
        self._answered()
        m = self.metrics
        m.response_cache_bytes.set(put.held_bytes)
        if put.evicted:
            m.response_cache_evictions.inc(put.evicted)
        self._count(pid, "skip_no_room" if put.result == NO_ROOM else "store")

    def _decode(self, pid: str, blob: bytes) -> Entry | None:
        try:
            entry = decode(blob)
            message = entry.message
            if message.get("stop_reason") not in CACHEABLE_STOP_REASONS or has_tool_error(message):
                raise CorruptEntry("an entry this gateway would not have stored")
            return entry
        except CorruptEntry as exc:
            log.warning("response cache entry unreadable: a miss", extra={"partner": pid, "error": str(exc)})
            return None

    def _count(self, pid: str, result: str) -> None:
        self.metrics.response_cache.labels(pid, result).inc()

    def _response_error(self, pid: str, exc: ResponseError, result: str) -> None:
        """Redis answered with an error. Refusing writes (a read-only replica, OOM) or a cluster
        without its slots is Redis failing for everyone: the shared health hears it. Any other
        (WRONGTYPE on the cache's keys, the script failing on their contents, an ACL refusing
        the cache's commands) is the cache's own fault: a miss, counted, and the limits, budgets
        and replay checks of every partner keep their Redis."""
        self._count(pid, result)  # the lookup or store result, either way
        if isinstance(exc, REDIS_DOWN_RESPONSES):
            self._failed(exc)
            return
        log.warning(
            "response cache refused by redis: a miss", extra={"partner": pid, "error": str(exc)[:200]}
        )
        self.metrics.internal_errors.labels(pid, "response_cache").inc()

    def _failed(self, exc: BaseException) -> None:
        if self.health is not None:
            self.health.failed(exc)

    def _answered(self) -> None:
        if self.shared and self.health is not None:
            self.health.ok()


def cached_response(
    entry: Entry, adm: Admitted, timings: Timings, request_timestamp_ms: int | None, cost: Mapping[str, Any]
) -> bytes:
    """The response document of a hit: the original message and usage, `attempts: 0`, this
    request's id and metadata (not the ones that filled the cache), `cached_from`, and
    `cost` (zero: `pricing.unbilled`)."""
    return encode_response(
        cost=cost,
        partner=adm.partner.id,
        request_id=adm.request_id,
        message_body=entry.message,
        attempts=0,
        upstream_request_id=None,
        timings=timings,
        completed_at=time.time(),
        request_timestamp_ms=request_timestamp_ms,
        metadata=adm.metadata,
        cached_from={"upstream_request_id": entry.upstream_request_id, "cached_at": utc_iso(entry.stored_at)},
    )
