"""Pause, drain and resume a partner without dead-lettering anything.

A held request waits here after admission, before it asks for a fair turn, a
budget reservation or a claim: nothing is billed, nothing is published, and
its offset stays uncommitted. Held requests count as outstanding, so the
ingest loop soon pauses the partner's partitions by its own backpressure (at
most the partner's fetch cap is held in memory; the backlog stays in Kafka).
A rebalance or a stop cancels held requests like any unclaimed one: the
partition's next owner reads them again.

- **pause**: hold every request of the partner not yet past this gate;
- **drain**: let the requests already in memory (waiting here or further on)
  finish, hold every later one; the partner then stays paused;
- **resume**: release them all.

With a `redis` section the state is shared by every replica and survives
restarts (`{prefix}:admin:partners`, one hash field per held partner); each
replica applies what it reads every `poll_s`. Without Redis it is this
replica's own and is lost on restart. A Redis that lost its data
(`service/config/redis_epoch.py`) resumes no one: the state is read with the
data epoch, and every replica writes its holds back first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson
from redis.exceptions import RedisError

from service.config.redis_epoch import RedisEpoch, RedisEpochChanged

log = logging.getLogger(__name__)

Mode = Literal["paused", "draining"]
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Hold:
    """Why a partner is held: the mode, who asked, from where and when (Unix seconds)."""

    mode: Mode
    by: str
    replica: str
    at: float


class _Gate:
    """The requests of one partner waiting while it is held."""

    __slots__ = ("event", "released", "waiting")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.released = False
        """Set with `event` when its waiters may go on (drain, resume)."""
        self.waiting = 0


class Pauses:
    """The held partners of this replica (mirrored from Redis when one is configured)."""

    def __init__(
        self, redis: Any | None = None, key_prefix: str = "claude-gateway", epoch: RedisEpoch | None = None
    ) -> None:
        self._redis = redis
        self._epoch = epoch
        self._key = "{" + key_prefix + "}:admin:partners"
        self.holds: dict[str, Hold] = {}
        self._gates: dict[str, _Gate] = {}
        self.store_error: str | None = None
        """The last error of the shared store (None while it answers or without one)."""

    @property
    def shared(self) -> bool:
        return self._redis is not None

    # -- the gate ---------------------------------------------------------------------------

    async def wait(self, partner_id: str) -> None:
        """Return at once unless the partner is held; else when it is resumed (or drained,
        for a request that was already waiting then)."""
        while partner_id in self.holds:
            gate = self._gates.setdefault(partner_id, _Gate())
            gate.waiting += 1
            try:
                await gate.event.wait()
            finally:
                gate.waiting -= 1
            if gate.released:
                return

    def waiting(self, partner_id: str) -> int:
        """Requests of the partner held at the gate now."""
        gate = self._gates.get(partner_id)
        return 0 if gate is None else gate.waiting

    # -- changes ----------------------------------------------------------------------------

    async def set(self, partner_id: str, hold: Hold | None) -> None:
        """Hold (pause, drain) or resume a partner here and, with Redis, on every replica.
        Raises the store's error when the change could not be shared (nothing changed then)."""
        if self._redis is not None:
            if hold is None:
                await self._redis.hdel(self._key, partner_id)
            else:
                await self._redis.hset(self._key, partner_id, orjson.dumps(asdict(hold)))
        self.apply(partner_id, hold)

    def apply(self, partner_id: str, hold: Hold | None) -> None:
        """Make `hold` this replica's state for the partner (no store involved)."""
        before = self.holds.get(partner_id)
        if hold is None:
            self.holds.pop(partner_id, None)
            self._release(partner_id)
            return
        self.holds[partner_id] = hold
        if hold.mode == "draining" and (before is None or before.mode != "draining"):
            self._release(partner_id)  # those waiting now go on; later ones wait on a new gate

    def _release(self, partner_id: str) -> None:
        gate = self._gates.pop(partner_id, None)
        if gate is not None:
            gate.released = True
            gate.event.set()

    async def sync(self) -> None:
        """Apply the shared state (no-op without Redis). Store errors are kept, not raised:
        the last known state stays in force."""
        if self._redis is None:
            return
        try:
            raw: Mapping[bytes | str, bytes | str] = await self._read()
        except _REDIS_ERRORS as exc:
            if self.store_error is None:
                log.warning(
                    "admin state store unreachable; keeping the partners' last known pause state",
                    extra={"error": type(exc).__name__},
                )
            self.store_error = type(exc).__name__
            return
        self.store_error = None
        shared: dict[str, Hold] = {}
        for field, value in raw.items():
            pid = field.decode() if isinstance(field, bytes) else field
            with contextlib.suppress(ValueError, TypeError, KeyError):
                doc = orjson.loads(value)
                shared[pid] = Hold(doc["mode"], str(doc["by"]), str(doc["replica"]), float(doc["at"]))
        for pid in set(self.holds) - set(shared):
            log.info("partner resumed by another replica", extra={"partner": pid})
            self.apply(pid, None)
        for pid, hold in shared.items():
            if self.holds.get(pid) != hold:
                log.info("partner held by another replica", extra={"partner": pid, "mode": hold.mode})
                self.apply(pid, hold)

    async def _read(self) -> Mapping[bytes | str, bytes | str]:
        """The shared holds; read with the data epoch, which must be this replica's (an emptied
        Redis holds no one: the holds are written back before they are read again)."""
        assert self._redis is not None
        if self._epoch is None:
            return await self._redis.hgetall(self._key)  # type: ignore[no-any-return]
        for _ in range(2):
            await self._epoch.current()
            async with self._redis.pipeline(transaction=True) as pipe:
                seen, raw = await pipe.get(self._epoch.key).hgetall(self._key).execute()
            if not self._epoch.differs(seen):
                return raw  # type: ignore[no-any-return]
            await self._epoch.lost()
        raise RedisEpochChanged("the redis data epoch kept changing")

    async def write_back(self) -> int:
        """Redis lost its data: hold again, on every replica, the partners held here."""
        if self._redis is None:
            return 0
        for pid, hold in list(self.holds.items()):
            await self._redis.hsetnx(self._key, pid, orjson.dumps(asdict(hold)))
        return len(self.holds)

    async def run(self, stop: asyncio.Event, poll_s: float = 1.0) -> None:
        """Sync until `stop` is set."""
        while not stop.is_set():
            await self.sync()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)


def new_hold(mode: Mode, by: str, replica: str) -> Hold:
    return Hold(mode, by, replica, time.time())
