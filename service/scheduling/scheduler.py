"""Weighted fair queuing of partners into the limiters.

Every upstream attempt asks for a turn (`acquire`) and gives it back
(`release`, settling the reservation with real usage). A turn needs:

1. a concurrency slot of the partner (`max_concurrency`) and of the service
   (`runtime.max_in_flight`);
2. capacity in the partner's own RPM/ITPM/OTPM buckets, and its key scope not
   paused by a 429;
3. capacity in the org pool of the request's model class, shared by all partners.

Waiting requests are grouped in flows, one per partner and model class, and each
pool serves its flows in fair order (`fairness.py`: start-time fair queuing by
dominant share, corrected by real usage). A flow blocked by its partner's limits,
concurrency or key pause is skipped, never blocking the others; a pool that is
out of capacity blocks only the flows that draw on it, so a Haiku partner is
never held back by Opus traffic.

When nobody waits, `acquire` grants at once without the dispatcher (the fast
path). `close()` fails every waiting turn with `Draining`, so a stopping
service gives back work it had not started instead of doing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from service.config.settings import GatewaySettings
from service.scheduling.fairness import FairShares, Flow
from service.scheduling.limiter import NOT_CALLED, Cost, Limiter, LocalLimiter, Usage
from service.scheduling.pools import LimitConfig, PauseScope
from service.scheduling.ratelimits import over_limit, scope_of_429

__all__ = ["NOT_CALLED", "Cost", "Draining", "Grant", "Scheduler", "Usage"]

DEFAULT_PAUSE_S = 1.0
"""How long a 429 without a usable `retry-after` pauses its scope."""


MIN_WAIT_S = 0.001
"""The shortest a refused turn waits before it asks the limiter again."""


class Draining(Exception):
    """The service is stopping: this request will be redelivered, not processed."""


@dataclass(slots=True)
class Grant:
    partner_id: str
    cost: Cost
    queue_wait_s: float
    limiter_wait_s: float
    charged: float = 0.0
    """What the fair share was charged at the grant (corrected at `release`)."""


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
    blocked_until: float = 0.0
    flows: dict[str, Flow[_Waiter]] = field(default_factory=dict)

    def flow(self, pool: str, fair: FairShares) -> Flow[_Waiter]:
        found = self.flows.get(pool)
        if found is None:
            found = self.flows[pool] = Flow(self.id, pool, pass_=fair.vtime(pool))
        return found


class Scheduler:
    def __init__(
        self,
        settings: GatewaySettings,
        limiter: Limiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.limits = LimitConfig.of(settings)
        self.limiter: Limiter = limiter or LocalLimiter(self.limits, clock=clock)
        self._fair = FairShares(self.limits.pools)
        self._partners: dict[str, _Partner] = {}
        self._pool_blocked: dict[str, float] = {}
        self._max_in_flight = settings.runtime.max_in_flight
        self._max_pause_s = settings.rate_limits.max_pause_s
        self._in_flight = 0
        self._waiting = 0
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self.reconfigure(settings)

    # -- configuration -------------------------------------------------------------

    def reconfigure(self, settings: GatewaySettings) -> None:
        self._max_in_flight = settings.runtime.max_in_flight
        self._max_pause_s = settings.rate_limits.max_pause_s
        self.limits = LimitConfig.of(settings)
        self._fair.configure(self.limits.pools)
        for p in settings.partners:
            st = self._partners.get(p.id)
            if st is None:
                self._partners[p.id] = _Partner(p.id, p.weight, p.max_concurrency)
            else:
                st.weight, st.max_concurrency = p.weight, p.max_concurrency
        self.limiter.configure(self.limits)
        self._pool_blocked.clear()
        self._wake.set()

    def model_class(self, model: str) -> str:
        """The org pool (model class) a model draws on."""
        return self.limits.model_class(model)

    # -- turns ---------------------------------------------------------------------

    def _partner(self, partner_id: str) -> _Partner:
        st = self._partners.get(partner_id)
        if st is None:
            st = self._partners[partner_id] = _Partner(partner_id, 1.0, 1)
        return st

    async def acquire(self, partner_id: str, cost: Cost) -> Grant:
        if self._closed:
            raise Draining
        st = self._partner(partner_id)
        flow = st.flow(cost.model_class, self._fair)
        self._fair.activate(flow)
        if self._waiting == 0 and st.in_flight < st.max_concurrency and self._in_flight < self._max_in_flight:
            st.in_flight += 1
            self._in_flight += 1
            decision = await self.limiter.acquire(partner_id, cost)
            if decision.ok:
                return Grant(partner_id, cost, 0.0, 0.0, self._fair.charge(flow, cost, st.weight))
            st.in_flight -= 1
            self._in_flight -= 1
            self._blocked(st, flow, decision.scope, decision.wait_s)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), cost, self._clock())
        if not flow.queue:  # a flow starts waiting: it may go first, let the pool be asked again
            self._pool_blocked.pop(flow.pool, None)
        flow.queue.append(waiter)
        self._waiting += 1
        self._ensure_dispatcher()
        self._wake.set()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(waiter.future.result(), NOT_CALLED)  # granted, never used: refund it
            elif waiter in flow.queue:
                flow.queue.remove(waiter)
                self._waiting -= 1
            raise

    def _blocked(self, st: _Partner, flow: Flow[_Waiter], scope: str | None, wait_s: float) -> None:
        until = self._clock() + max(wait_s, MIN_WAIT_S)
        if scope == "org":
            self._pool_blocked[flow.pool] = max(self._pool_blocked.get(flow.pool, 0.0), until)
        else:
            st.blocked_until = max(st.blocked_until, until)

    def release(self, grant: Grant, usage: Usage | None) -> None:
        """Give the turn back; settle the reservation with what the call used (`NOT_CALLED`:
        it was never made, everything comes back; None: outcome unknown, keep it all)."""
        st = self._partners[grant.partner_id]
        st.in_flight -= 1
        self._in_flight -= 1
        self.limiter.settle(grant.partner_id, grant.cost, usage)
        flow = st.flow(grant.cost.model_class, self._fair)
        self._fair.settle(flow, grant.cost, grant.charged, usage, st.weight)
        if usage is not None:  # a refund may let the blocked go now: let them ask again
            self._pool_blocked.pop(grant.cost.model_class, None)
            st.blocked_until = 0.0
        if self._waiting:
            self._wake.set()

    def observe_headers(self, grant: Grant, headers: Mapping[str, str]) -> None:
        """An answer's rate-limit headers, for the pool the call drew on."""
        self.limiter.observe_headers(grant.partner_id, grant.cost, headers)

    def over_limit(self, grant: Grant, headers: Mapping[str, str]) -> str | None:
        """A 429 that no wait ends (`ratelimits.over_limit`): why, or None. Nothing is paused."""
        pool = self.limits.pool(grant.cost.model_class)
        return over_limit(headers, pool, self._amounts(grant))

    @staticmethod
    def _amounts(grant: Grant) -> dict[str, float]:
        return dict(zip(("rpm", "itpm", "otpm"), grant.cost.amounts(), strict=True))

    def rate_limited(
        self, grant: Grant, headers: Mapping[str, str], retry_after_s: float | None
    ) -> tuple[PauseScope, float]:
        """A 429: pause the scope it is about (the org pool, or the key's scope), at most
        `rate_limits.max_pause_s`. Returns the scope and the pause."""
        pool = self.limits.pool(grant.cost.model_class)
        kind = scope_of_429(headers, pool, self._amounts(grant))
        seconds = min(DEFAULT_PAUSE_S if retry_after_s is None else retry_after_s, self._max_pause_s)
        until = self._clock() + seconds
        if kind == "org":
            scope = PauseScope("org", grant.cost.model_class)
            self._pool_blocked[scope.name] = max(self._pool_blocked.get(scope.name, 0.0), until)
        else:
            scope = PauseScope("key", self.limits.scope_of(grant.partner_id))
            for pid in {grant.partner_id, *self.limits.members(scope.name)}:
                st = self._partner(pid)
                st.blocked_until = max(st.blocked_until, until)
        self.limiter.pause(scope, seconds)
        return scope, seconds

    def queued(self, partner_id: str) -> int:
        st = self._partners.get(partner_id)
        return sum(len(f.queue) for f in st.flows.values()) if st is not None else 0

    def in_flight(self, partner_id: str | None = None) -> int:
        """Turns held now: the partner's, or the service's."""
        if partner_id is None:
            return self._in_flight
        st = self._partners.get(partner_id)
        return st.in_flight if st is not None else 0

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

    def _waiting_flows(self) -> Iterator[tuple[_Partner, Flow[_Waiter]]]:
        for st in self._partners.values():
            for flow in st.flows.values():
                if flow.queue:
                    yield st, flow

    async def _dispatch_some(self) -> float | None:
        """Grant as many turns as possible; return how long to sleep (None: until woken)."""
        while self._waiting:
            if self._in_flight >= self._max_in_flight:
                return None
            now = self._clock()
            best: tuple[_Partner, Flow[_Waiter]] | None = None
            best_key: tuple[float, int] | None = None
            next_unblock: float | None = None
            for st, flow in self._waiting_flows():
                if st.in_flight >= st.max_concurrency:
                    continue
                blocked = max(st.blocked_until, self._pool_blocked.get(flow.pool, 0.0))
                if blocked > now:
                    next_unblock = blocked if next_unblock is None else min(next_unblock, blocked)
                    continue
                key = self._fair.order(flow)
                if best_key is None or key < best_key:
                    best, best_key = (st, flow), key
            if best is None:
                return None if next_unblock is None else next_unblock - now
            st, flow = best
            waiter = flow.queue[0]
            if waiter.future.done():  # cancelled meanwhile
                flow.queue.popleft()
                self._waiting -= 1
                continue
            st.in_flight += 1
            self._in_flight += 1
            asked = self._clock()
            decision = await self.limiter.acquire(st.id, waiter.cost)
            if not decision.ok:
                st.in_flight -= 1
                self._in_flight -= 1
                self._blocked(st, flow, decision.scope, decision.wait_s)
                if decision.scope == "org":
                    waiter.limiter_wait_s += decision.wait_s
                continue
            if not flow.queue or flow.queue[0] is not waiter or waiter.future.done():
                # closed or cancelled while the limiter answered (it may suspend): give it back
                st.in_flight -= 1
                self._in_flight -= 1
                self.limiter.settle(st.id, waiter.cost, NOT_CALLED)
                continue
            flow.queue.popleft()
            self._waiting -= 1
            charged = self._fair.charge(flow, waiter.cost, st.weight)
            total_wait = max(0.0, asked - waiter.enqueued)
            limiter_wait = min(total_wait, waiter.limiter_wait_s)
            waiter.future.set_result(
                Grant(st.id, waiter.cost, total_wait - limiter_wait, limiter_wait, charged)
            )
        return None

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Refuse new turns and fail every waiting one with `Draining`."""
        self._closed = True
        for st in self._partners.values():
            for flow in st.flows.values():
                while flow.queue:
                    waiter = flow.queue.popleft()
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
