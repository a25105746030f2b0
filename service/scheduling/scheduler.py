"""Weighted fair queuing of partners into the limiters.

Every upstream attempt asks for a turn (`acquire`) and gives it back
(`release`, settling the reservation with real usage). A turn needs:

1. a concurrency slot of the partner (`max_concurrency`) and of the service
   (`runtime.max_in_flight`);
2. capacity in the partner's own RPM/ITPM/OTPM buckets;
3. capacity in the org-wide buckets, shared by all partners.

Waiting partners are served in order of their virtual time ("pass", as in
stride scheduling / start-time fair queuing): a turn advances the partner's
pass by its cost over its weight, where the cost is the share of the org's
per-minute budget the request uses on its most binding dimension. A busy
partner therefore gets its weighted share, an idle partner's share goes to the
busy ones, and a partner that just arrived starts at the current virtual time:
it is served next, however long another's backlog is. A partner blocked by its
own limits or concurrency is skipped, never blocking the others.

Passes are kept within [vtime, vtime + LEAD] at every decision: a partner
cannot bank credit while it was idle or capped, and a partner that used spare
capacity while nobody contended owes at most LEAD (about a second of the org's
budget), so the start of contention never starves anyone.

When nobody waits, `acquire` grants at once without the dispatcher (the fast
path). `close()` fails every waiting turn with `Draining`, so a stopping
service gives back work it had not started instead of doing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from service.config.settings import GatewaySettings, LimitSettings
from service.scheduling.limiter import Cost, Limiter, LocalLimiter, Usage

__all__ = ["Cost", "Draining", "Grant", "Scheduler", "Usage"]

LEAD = 1.0 / 60
"""How far ahead of the virtual time a partner's pass may run: one second of the org budget."""


class Draining(Exception):
    """The service is stopping: this request will be redelivered, not processed."""


@dataclass(slots=True)
class Grant:
    partner_id: str
    cost: Cost
    queue_wait_s: float
    limiter_wait_s: float


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Grant]
    cost: Cost
    enqueued: float
    limiter_wait_s: float = 0.0


@dataclass(slots=True)
class _Partner:
    id: str
    weight: float
    max_concurrency: int
    in_flight: int = 0
    pass_: float = 0.0
    blocked_until: float = 0.0
    queue: deque[_Waiter] = field(default_factory=deque)


class Scheduler:
    def __init__(
        self,
        settings: GatewaySettings,
        limiter: Limiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.limiter: Limiter = limiter or LocalLimiter(
            settings.org_limits, {p.id: p.limits for p in settings.partners}, clock=clock
        )
        self._partners: dict[str, _Partner] = {}
        self._max_in_flight = settings.runtime.max_in_flight
        self._in_flight = 0
        self._waiting = 0
        self._vtime = 0.0
        self._org = settings.org_limits
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self.reconfigure(settings)

    # -- configuration -------------------------------------------------------------

    def reconfigure(self, settings: GatewaySettings) -> None:
        self._max_in_flight = settings.runtime.max_in_flight
        self._org = settings.org_limits
        for p in settings.partners:
            st = self._partners.get(p.id)
            if st is None:
                self._partners[p.id] = _Partner(p.id, p.weight, p.max_concurrency, pass_=self._vtime)
            else:
                st.weight, st.max_concurrency = p.weight, p.max_concurrency
        self.limiter.configure(settings.org_limits, {p.id: p.limits for p in settings.partners})
        self._wake.set()

    def _norm_cost(self, cost: Cost) -> float:
        """The share of the org's per-minute budget this cost uses, on its most binding dimension."""
        org: LimitSettings = self._org
        shares = [1.0 / org.rpm if org.rpm else 0.0]
        if org.itpm:
            shares.append(cost.input_tokens / org.itpm)
        if org.otpm:
            shares.append(cost.output_tokens / org.otpm)
        best = max(shares)
        return best if best > 0 else 1.0

    # -- turns ---------------------------------------------------------------------

    async def acquire(self, partner_id: str, cost: Cost) -> Grant:
        if self._closed:
            raise Draining
        st = self._partners.get(partner_id)
        if st is None:
            st = self._partners[partner_id] = _Partner(partner_id, 1.0, 1, pass_=self._vtime)
        if self._waiting == 0 and st.in_flight < st.max_concurrency and self._in_flight < self._max_in_flight:
            st.in_flight += 1
            self._in_flight += 1
            decision = await self.limiter.acquire(partner_id, cost)
            if decision.ok:
                self._charge(st, cost)
                return Grant(partner_id, cost, 0.0, 0.0)
            st.in_flight -= 1
            self._in_flight -= 1
            if decision.scope == "partner":
                st.blocked_until = self._clock() + decision.wait_s
        waiter = _Waiter(asyncio.get_running_loop().create_future(), cost, self._clock())
        st.queue.append(waiter)
        self._waiting += 1
        self._ensure_dispatcher()
        self._wake.set()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(waiter.future.result(), None)
            elif waiter in st.queue:
                st.queue.remove(waiter)
                self._waiting -= 1
            raise

    def _clamped(self, st: _Partner) -> float:
        st.pass_ = min(max(st.pass_, self._vtime), self._vtime + LEAD)
        return st.pass_

    def _charge(self, st: _Partner, cost: Cost) -> None:
        """A turn was granted: the virtual time moves to its start, the partner's pass past it."""
        start = self._clamped(st)
        self._vtime = max(self._vtime, start)
        st.pass_ = start + self._norm_cost(cost) / st.weight

    def release(self, grant: Grant, usage: Usage | None) -> None:
        """Give the turn back; settle the reservation (None: outcome unknown, keep it)."""
        st = self._partners[grant.partner_id]
        st.in_flight -= 1
        self._in_flight -= 1
        self.limiter.settle(grant.partner_id, grant.cost, usage)
        if self._waiting:
            self._wake.set()

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        self.limiter.observe_headers(headers)

    def rate_limited(self, retry_after_s: float | None) -> None:
        """A 429: pause every draw on the org buckets for retry-after."""
        self.limiter.pause(retry_after_s if retry_after_s is not None else 1.0)

    def queued(self, partner_id: str) -> int:
        st = self._partners.get(partner_id)
        return len(st.queue) if st is not None else 0

    # -- the dispatcher ------------------------------------------------------------

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop())

    async def _dispatch_loop(self) -> None:
        while not self._closed:
            sleep_s = await self._dispatch_some()
            if self._waiting == 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._wake.clear()
            if sleep_s is None:  # waiting for a slot to be released
                await self._wake.wait()
            elif sleep_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=sleep_s)

    async def _dispatch_some(self) -> float | None:
        """Grant as many turns as possible; return how long to sleep (None: until woken)."""
        while self._waiting:
            if self._in_flight >= self._max_in_flight:
                return None
            now = self._clock()
            best: _Partner | None = None
            next_unblock: float | None = None
            for st in self._partners.values():
                if not st.queue or st.in_flight >= st.max_concurrency:
                    continue
                if st.blocked_until > now:
                    next_unblock = (
                        st.blocked_until if next_unblock is None else min(next_unblock, st.blocked_until)
                    )
                    continue
                if best is None or self._clamped(st) < best.pass_:
                    best = st
            if best is None:
                return None if next_unblock is None else next_unblock - now
            waiter = best.queue[0]
            if waiter.future.done():  # cancelled meanwhile
                best.queue.popleft()
                self._waiting -= 1
                continue
            best.in_flight += 1
            self._in_flight += 1
            asked = self._clock()
            decision = await self.limiter.acquire(best.id, waiter.cost)
            if not decision.ok:
                best.in_flight -= 1
                self._in_flight -= 1
                if decision.scope == "partner":
                    best.blocked_until = self._clock() + decision.wait_s
                    continue
                waiter.limiter_wait_s += decision.wait_s
                return decision.wait_s
            if not best.queue or best.queue[0] is not waiter or waiter.future.done():
                # closed or cancelled while the limiter answered (it may suspend): give it back
                self.release(Grant(best.id, waiter.cost, 0.0, 0.0), Usage(0, 0))
                continue
            best.queue.popleft()
            self._waiting -= 1
            self._charge(best, waiter.cost)
            total_wait = max(0.0, asked - waiter.enqueued)
            limiter_wait = min(total_wait, waiter.limiter_wait_s)
            waiter.future.set_result(Grant(best.id, waiter.cost, total_wait - limiter_wait, limiter_wait))
        return None

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Refuse new turns and fail every waiting one with `Draining`."""
        self._closed = True
        for st in self._partners.values():
            while st.queue:
                waiter = st.queue.popleft()
                if not waiter.future.done():
                    waiter.future.set_exception(Draining())
        self._waiting = 0
        self._wake.set()

    async def aclose(self) -> None:
        self.close()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
