"""Grant each upstream attempt a turn: partner concurrency, then the limiters.

`acquire` waits until the partner has a free concurrency slot and the global
cap allows another call; `release` gives the slot back and settles the
reservation with real usage.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from service.config.settings import GatewaySettings


@dataclass(frozen=True, slots=True)
class Cost:
    """What one attempt reserves: a request, estimated input and max output tokens."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(slots=True)
class Grant:
    partner_id: str
    cost: Cost
    queue_wait_s: float
    limiter_wait_s: float


class Scheduler:
    def __init__(self, settings: GatewaySettings) -> None:
        self._global = asyncio.Semaphore(settings.runtime.max_in_flight)
        self._partner: dict[str, asyncio.Semaphore] = {
            p.id: asyncio.Semaphore(p.max_concurrency) for p in settings.partners
        }

    def reconfigure(self, settings: GatewaySettings) -> None:
        for p in settings.partners:
            self._partner.setdefault(p.id, asyncio.Semaphore(p.max_concurrency))

    async def acquire(self, partner_id: str, cost: Cost) -> Grant:
        started = time.perf_counter()
        await self._partner[partner_id].acquire()
        try:
            await self._global.acquire()
        except BaseException:
            self._partner[partner_id].release()
            raise
        return Grant(partner_id, cost, time.perf_counter() - started, 0.0)

    def release(self, grant: Grant, usage: Usage | None) -> None:
        self._global.release()
        self._partner[grant.partner_id].release()
