"""Batch turnarounds shared between replicas through Redis.

Only the replica whose batch worker owns the pending partition sees batches end; every replica
routes `auto` requests. Without sharing, the others would route by the configured prior
(`batches.expected_turnaround_s`) for good: with real batches slower than it, their `auto`
requests would go to batches that end after their deadlines. Each replica pushes what its
worker observed to one capped Redis list, `{prefix}:batch:turnarounds` (the newest
`Turnaround.keep`, kept 30 days after the last push), and replaces its own view by that list
every `REFRESH_S`. Without Redis (or while it fails) each replica keeps its own observations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from service.batches.routing import Turnaround
from service.config.redis_health import REDIS_ERRORS

log = logging.getLogger(__name__)

REFRESH_S = 15.0
KEEP_S = 30 * 86_400


class SharedTurnarounds:
    def __init__(self, redis: Any, key_prefix: str, turnaround: Turnaround) -> None:
        self.redis = redis
        self.key = "{" + key_prefix + "}:batch:turnarounds"
        self.turnaround = turnaround

    async def sync(self) -> None:
        """Push this replica's new observations, then take the shared list as the view."""
        keep = self.turnaround.keep
        fresh = self.turnaround.take_unshared()
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                if fresh:
                    pipe.lpush(self.key, *[repr(s) for s in fresh])
                    pipe.ltrim(self.key, 0, keep - 1)
                    pipe.expire(self.key, KEEP_S)
                pipe.lrange(self.key, 0, keep - 1)
                raw = (await pipe.execute())[-1]
        except REDIS_ERRORS as exc:
            self.turnaround.unshare(fresh)  # pushed at the next sync
            log.debug("batch turnarounds not shared this time", extra={"error": type(exc).__name__})
            return
        seen = [v for v in (_seconds(r) for r in reversed(raw)) if v is not None]
        if seen:
            self.turnaround.replace(seen)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sync()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REFRESH_S)
        await self.sync()  # what this replica saw last is not lost with it


def _seconds(raw: Any) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None
