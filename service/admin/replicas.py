"""The replicas of the service, for the console: each one announces itself in Redis.

Every `interval_s` a replica writes `{prefix}:admin:replicas[<its id>]` (host,
pid, version, start time, partitions owned, readiness, last seen). The
console lists those seen within `fresh_s`; older entries are removed after an
hour. Without Redis the console knows only its own replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
from redis.exceptions import RedisError

from service.contracts.outcomes import utc_iso
from service.version import version

_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
FORGET_S = 3_600.0


class Replicas:
    def __init__(
        self,
        replica_id: str,
        describe: Callable[[], dict[str, Any]],
        redis: Any | None = None,
        key_prefix: str = "claude-gateway",
        fresh_s: float = 15.0,
    ) -> None:
        self.replica_id = replica_id
        self._describe = describe
        self._redis = redis
        self._key = "{" + key_prefix + "}:admin:replicas"
        self._fresh_s = fresh_s
        self._started = time.time()

    def me(self) -> dict[str, Any]:
        return {
            "id": self.replica_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": version(),
            "started_at": utc_iso(self._started),
            "seen_at": time.time(),
            **self._describe(),
        }

    async def announce(self) -> None:
        if self._redis is None:
            return
        with contextlib.suppress(*_REDIS_ERRORS):
            await self._redis.hset(self._key, self.replica_id, orjson.dumps(self.me()))

    async def list(self) -> list[dict[str, Any]]:
        """The replicas seen within `fresh_s` (this one always), newest first."""
        mine = self.me()
        found: dict[str, dict[str, Any]] = {self.replica_id: mine}
        if self._redis is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                raw = await self._redis.hgetall(self._key)
                now = time.time()
                stale = []
                for field, value in raw.items():
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        doc = orjson.loads(value)
                        age = now - float(doc["seen_at"])
                        if age > FORGET_S:
                            stale.append(field)
                        elif age <= self._fresh_s and doc.get("id") != self.replica_id:
                            found[str(doc["id"])] = doc
                if stale:
                    await self._redis.hdel(self._key, *stale)
        rows = sorted(found.values(), key=lambda d: d["id"])
        for row in rows:
            row["seen_at"] = utc_iso(float(row["seen_at"]))
            row["this"] = row["id"] == self.replica_id
        return rows

    async def run(self, stop: asyncio.Event, interval_s: float = 5.0) -> None:
        while not stop.is_set():
            await self.announce()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
        if self._redis is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._redis.hdel(self._key, self.replica_id)
