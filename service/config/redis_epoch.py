"""Whether the shared Redis still holds what the gateway wrote there: its data epoch.

A Redis restarted without persistence, flushed, or failed over to a replica that had
nothing answers like any other Redis, but empty: the budgets' spend of the current periods,
the replay sightings and the partners' pauses are gone. Without a check, partners could
spend their budgets again, a copy of an answered request could be answered (and billed)
again by another replica, and a paused partner would resume.

The check: the key `{prefix}:epoch` holds an id of the data's generation, created once
(`SET NX`, no expiry) and read by every replica at its first contact. Every script that
counts (budget reservations and settlements, replay checks, the push of outage spend)
first compares it with the epoch its replica knows, atomically, and changes nothing when
it differs (`EPOCH_LOST`). An idle replica reads it every `watch_interval_s`; the pause
state is read with it.

When a replica finds its epoch gone or changed, it logs an error, counts it
(`gateway_redis_data_lost_total`), creates the new epoch if no replica has yet, and writes
back what it holds locally, without lowering anything a replica wrote since: the budget
counters it last read (the highest copy wins), its replay sightings, its pauses
(`on_lost`). It then waits `grace_s`, so that the other replicas, which notice within
`watch_interval_s`, have written theirs back before it counts or checks anything again.
What no live replica held is lost: spend counted by a replica that has since stopped, and
the sightings of its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

EPOCH_LOST = b"epoch-lost"
_GUARD = """local epoch_key = table.remove(KEYS)
local epoch = table.remove(ARGV)
if redis.call('GET', epoch_key) ~= epoch then return 'epoch-lost' end
"""
"""Put before a script's body: its last key is the epoch key, its last argument the epoch."""
_LOST_ANSWERS = (EPOCH_LOST, EPOCH_LOST.decode())

Restorer = Callable[[], Awaitable[int]]
"""Writes this replica's copies back into an emptied Redis; returns how many entries."""


class RedisEpochChanged(RedisError):
    """The epoch changed again while the script waited for the last recovery: the call falls
    back to local state like any failed Redis call."""


def _text(raw: Any) -> str | None:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw


class RedisEpoch:
    """The data epoch this replica knows, and the recovery when Redis has lost it."""

    def __init__(
        self,
        client: Any,
        key: str,
        *,
        grace_s: float = 3.0,
        watch_interval_s: float = 1.0,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self.key = key
        self.value: str | None = None
        """The epoch this replica's scripts run under (None before its first contact)."""
        self.grace_s = grace_s
        self.watch_interval_s = watch_interval_s
        self._on_lost = on_lost
        self.losses = 0
        """Times this replica found the data gone."""
        self._reported: str | None = None
        self._restorers: list[tuple[str, Restorer]] = []
        self._recovery: asyncio.Task[None] | None = None

    def on_lost(self, what: str, restorer: Restorer) -> None:
        """`restorer()` writes `what` back when the data is found gone."""
        self._restorers.append((what, restorer))

    def script(self, body: str) -> GuardedScript:
        """A Lua script that runs only under this replica's epoch (`GuardedScript`)."""
        return GuardedScript(self, self._client.register_script(_GUARD + body))

    async def current(self) -> str:
        """The epoch to run a script under: after a recovery in progress, adopted at first use."""
        if self._recovery is not None and not self._recovery.done():
            await asyncio.shield(self._recovery)
        if self.value is None:
            self.value = await self._adopt()
        return self.value

    def differs(self, seen: Any) -> bool:
        """`seen`, read from Redis, is not this replica's epoch (and this replica knows one)."""
        return self.value is not None and _text(seen) != self.value

    async def check(self) -> None:
        """Read the epoch; recover when it is gone or another one. Raises Redis' errors."""
        if self.value is None:
            self.value = await self._adopt()
        elif self.differs(await self._client.get(self.key)):
            await self.lost()

    async def lost(self) -> None:
        """A script or a read found another epoch: recover (once, whoever asks)."""
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())
        await asyncio.shield(self._recovery)

    async def watch(self, paused: Callable[[], bool]) -> None:
        """Check every `watch_interval_s` unless `paused()` (Redis is down: its probe checks)."""
        while True:
            await asyncio.sleep(self.watch_interval_s)
            if paused():
                continue
            try:
                await self.check()
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("redis epoch check failed", extra={"error": type(exc).__name__})

    async def aclose(self) -> None:
        """Stop a recovery in progress (the service stops)."""
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError, TimeoutError):
                await self._recovery

    async def _adopt(self) -> str:
        """The epoch in Redis, created when there is none."""
        fresh = f"{uuid.uuid4().hex[:16]} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        await self._client.set(self.key, fresh, nx=True)
        return _text(await self._client.get(self.key)) or fresh

    async def _recover(self) -> None:
        before = self.value
        if not self.differs(await self._client.get(self.key)):
            return  # nothing changed after all (a script raced a recovery that ended)
        now = await self._adopt()
        if self._reported != before:  # once per loss, even if a restore fails and is retried
            self._reported = before
            self.losses += 1
            if self._on_lost is not None:
                self._on_lost()
            log.error(
                "redis lost the gateway's data (restarted empty, flushed, or failed over to a "
                "replica without it): writing back this replica's budget counters, replay "
                "sightings and pauses; make Redis persist its data",
                extra={"epoch_before": before, "epoch_now": now},
            )
        restored: dict[str, int] = {}
        for what, restore in self._restorers:
            try:
                restored[what] = await restore()
            except (RedisError, OSError, TimeoutError):
                raise  # Redis failed again: the next check or call retries the whole recovery
            except Exception:  # a restorer's bug must not stop the others
                log.exception("restoring after redis lost its data failed", extra={"what": what})
        log.warning(
            "written back into redis after it lost its data",
            extra={what.replace(" ", "_"): n for what, n in restored.items()},
        )
        await asyncio.sleep(self.grace_s)  # the other replicas write theirs back meanwhile
        self.value = now


class GuardedScript:
    """A registered script whose first lines compare the epoch (`_GUARD`); called like
    redis-py's `Script`, it passes the epoch key and value itself and recovers when they differ."""

    def __init__(self, epoch: RedisEpoch, script: Any) -> None:
        self._epoch = epoch
        self._script = script

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        for _ in range(3):
            value = await self._epoch.current()
            raw = await self._script(keys=[*keys, self._epoch.key], args=[*args, value])
            if raw not in _LOST_ANSWERS:
                return raw
            await self._epoch.lost()
        raise RedisEpochChanged("the redis data epoch kept changing")


def register(client: Any, body: str, epoch: RedisEpoch | None) -> Any:
    """`body` registered under the epoch when there is one, else as a plain script."""
    return epoch.script(body) if epoch is not None else client.register_script(body)
