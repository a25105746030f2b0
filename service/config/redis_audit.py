"""Whether the shared Redis may drop the gateway's keys one by one: its eviction.

A Redis with a `maxmemory` and any `maxmemory-policy` but `noeviction` deletes keys when it
is full: a budget counter, a replay sighting or a pause evicted is gone without a trace
(the data epoch, `redis_epoch.py`, stays, so nothing is written back), and a partner may
spend its budget again or a copy of an answered request be answered again. The docs ask for
`noeviction` (docs/operations.md); this checks it, from `INFO memory` and `INFO stats`
(allowed where `CONFIG` is not, as on managed Redis services), at the first contact and
every `interval_s`:

- the setting: `gateway_redis_may_evict` is 1 and a WARNING is logged (once, and again
  when it changes) while Redis may evict;
- the evidence: Redis' own `evicted_keys` counter. Each rise seen is logged at ERROR and
  added to `gateway_redis_evicted_keys_total` (the keys may be another application's on a
  shared Redis: the gateway cannot tell them apart). What it had counted before this
  replica's first look is logged once, not counted.

A Redis that refuses `INFO` (an ACL user without `@dangerous`) is not checked: said once at
INFO level. Nothing here marks Redis down: a failed audit is not a failed call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoPermissionError, RedisError, ResponseError

log = logging.getLogger(__name__)

INTERVAL_S = 30.0


class RedisAudit:
    def __init__(
        self,
        client: Any,
        *,
        may_evict: Callable[[bool], None] = lambda _: None,
        evicted: Callable[[int], None] = lambda _: None,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self._client = client
        self._may_evict = may_evict
        self._evicted = evicted
        self.interval_s = interval_s
        self.policy: str | None = None
        """The policy as last read, when Redis may evict (None: it may not, or not read yet)."""
        self._seen_evicted: int | None = None
        self._run_id: str | None = None
        self.refused = False
        """Redis refused `INFO`: not checked any more."""

    async def check(self) -> None:
        """Read the setting and the evictions once. Raises Redis' errors but a refusal."""
        if self.refused:
            return
        try:
            memory = await self._client.info("memory")
            stats = await self._client.info("stats")
            server = await self._client.info("server")
        except (NoPermissionError, ResponseError) as exc:
            self.refused = True
            log.info("redis refuses INFO: its eviction policy is not checked", extra={"error": str(exc)})
            return
        self._setting(memory)
        self._evictions(int(stats.get("evicted_keys", 0)), str(server.get("run_id", "")))

    async def run(self) -> None:
        """`check()` every `interval_s` (and at once) until cancelled."""
        while True:
            try:
                await self.check()
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("redis audit failed", extra={"error": type(exc).__name__})
            if self.refused:
                return
            await asyncio.sleep(self.interval_s)

    def _setting(self, memory: dict[str, Any]) -> None:
        policy = str(memory.get("maxmemory_policy", "noeviction"))
        risky = int(memory.get("maxmemory", 0)) > 0 and policy != "noeviction"
        now = policy if risky else None
        if now != self.policy:
            if now is not None:
                log.warning(
                    "redis may evict the gateway's keys: budgets, replay sightings and pauses can "
                    "be lost without a trace; set maxmemory-policy noeviction",
                    extra={"maxmemory_policy": policy, "maxmemory": memory.get("maxmemory")},
                )
            elif self.policy is not None:
                log.info("redis no longer evicts keys", extra={"maxmemory_policy": policy})
        self.policy = now
        self._may_evict(risky)

    def _evictions(self, evicted: int, run_id: str) -> None:
        if run_id != self._run_id:  # first look, or Redis restarted: its counter did too
            if self._run_id is None and evicted:
                log.warning(
                    "redis has evicted keys since it started (before this replica looked)",
                    extra={"evicted_keys": evicted},
                )
            self._run_id, self._seen_evicted = run_id, evicted
            return
        rise = evicted - (self._seen_evicted or 0)
        self._seen_evicted = evicted
        if rise > 0:
            log.error(
                "redis evicted keys: the gateway's budget counters, replay sightings or pauses "
                "may be among them; set maxmemory-policy noeviction",
                extra={"evicted_keys": rise, "maxmemory_policy": self.policy},
            )
            self._evicted(rise)
