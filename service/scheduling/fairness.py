"""Fair shares of each org pool: start-time fair queuing over flows, charged by dominant share.

A flow is one partner's requests for one model class (one org pool). Each pool
has its own virtual time; each flow a pass. A granted request's cost is the
share of its pool's per-minute budget it takes on its dominant dimension
(requests, input or output tokens: dominant resource fairness), so equal weights
give equal shares of whichever resource binds, whatever the request sizes. The
pass advances by cost / weight when the turn is granted, at what the flow's turns
lately used of what they reserved, and is corrected when the call ends by what it
really used: a partner whose `max_tokens` or input estimate overstates its use is
not charged for the difference, and is not owed a burst of turns later either.

- Serving the flow with the lowest pass gives each busy flow its weighted share.
- A flow's pass is raised to the pool's virtual time whenever it is considered
  (it cannot bank credit while it was idle, capped by concurrency, or blocked by
  its own limits), and the virtual time follows the start of each granted turn,
  so a flow that ran alone owes at most its last request when contention starts.
  Only refunds of its own turns may leave it below the virtual time, by as much as
  they brought it there; waiting while others are served never deepens that.
- There is no cap on how far a pass may lead: a request is charged its whole
  cost, however large (a cap is what made large requests cheap before).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.config.settings import LimitSettings
from service.scheduling.limiter import Cost, Usage
from service.scheduling.pools import DEFAULT_CLASS

W = TypeVar("W")
_LEARN = 0.2
_MIN_RATIO, _MAX_RATIO = 0.02, 2.0


@dataclass(slots=True, eq=False)
class Flow(Generic[W]):
    """One partner's waiting requests for one pool, and its place in that pool's fair order."""

    partner_id: str
    pool: str
    queue: deque[W] = field(default_factory=deque)
    pass_: float = 0.0
    credit: float = 0.0
    """How far below the virtual time its pass may stay: set by its own refunds (a refund that
    arrives after the virtual time moved on is kept, not clamped away), never grown by waiting."""
    in_flight: int = 0
    ratio: float = 1.0
    """What its turns used over what they reserved, lately: a turn is charged its expected use."""
    served: int = 0
    """When it was last granted (a sequence number): ties go to the longest unserved."""


def dominant_share(pool: LimitSettings, requests: float, input_tokens: float, output_tokens: float) -> float:
    """The share of the pool's per-minute budget used, on its most used dimension."""
    shares = [requests / pool.rpm if pool.rpm else 0.0]
    if pool.itpm:
        shares.append(input_tokens / pool.itpm)
    if pool.otpm:
        shares.append(output_tokens / pool.otpm)
    return max(shares)


class FairShares:
    """Virtual times per pool and the passes of flows; no I/O, no clock."""

    def __init__(self, pools: Mapping[str, LimitSettings]) -> None:
        self._pools = dict(pools)
        self._vtime: dict[str, float] = {}
        self._seq = itertools.count(1)

    def configure(self, pools: Mapping[str, LimitSettings]) -> None:
        self._pools = dict(pools)

    def vtime(self, pool: str) -> float:
        return self._vtime.get(pool, 0.0)

    def _limits(self, pool: str) -> LimitSettings:
        return self._pools.get(pool) or self._pools.get(DEFAULT_CLASS) or LimitSettings()

    def cost(self, pool: str, cost: Cost) -> float:
        """What a turn is charged at grant: its reservation's dominant share (1 when no limit)."""
        share = dominant_share(self._limits(pool), 1.0, cost.input_tokens, cost.output_tokens)
        return share if share > 0 else 1.0

    def used(self, pool: str, cost: Cost, usage: Usage) -> float:
        """What a finished turn used, on the same scale as `cost`."""
        limits = self._limits(pool)
        if not (limits.rpm or limits.itpm or limits.otpm):
            return float(min(1, usage.requests))
        return dominant_share(limits, min(1, usage.requests), usage.input_tokens, usage.output_tokens)

    def order(self, flow: Flow[W]) -> tuple[float, int]:
        """Sort key among waiting flows: lag behind the pool's virtual time, then longest unserved.

        Raises the flow's pass to the virtual time first, less its credit (no banked credit)."""
        vtime = self._vtime.get(flow.pool, 0.0)
        floor = vtime - flow.credit
        if flow.pass_ < floor:
            flow.pass_ = floor
        return (flow.pass_ - vtime, flow.served)

    def activate(self, flow: Flow[W]) -> None:
        """The flow starts waiting. Back from idle (nothing in flight), it keeps no credit."""
        if flow.in_flight == 0 and not flow.queue:
            flow.credit = 0.0

    def charge(self, flow: Flow[W], cost: Cost, weight: float) -> float:
        """A turn was granted: the virtual time moves to its start, the flow's pass past it by
        the turn's expected use. Returns what was charged (give it back to `settle`)."""
        vtime = self._vtime.get(flow.pool, 0.0)
        start = max(flow.pass_, vtime - flow.credit)
        vtime = self._vtime[flow.pool] = max(vtime, start)
        charged = self.cost(flow.pool, cost) * flow.ratio
        flow.pass_ = start + charged / weight
        flow.credit = max(0.0, vtime - flow.pass_)
        flow.in_flight += 1
        flow.served = next(self._seq)
        return charged

    def settle(self, flow: Flow[W], cost: Cost, charged: float, usage: Usage | None, weight: float) -> None:
        """The turn ended: charge what it used instead of what it was charged (usage None: the
        outcome is unknown, charge the whole reservation)."""
        flow.in_flight = max(0, flow.in_flight - 1)
        reserved = self.cost(flow.pool, cost)
        used = reserved if usage is None else self.used(flow.pool, cost, usage)
        if usage is not None and usage.requests:
            ratio = used / reserved
            flow.ratio = min(_MAX_RATIO, max(_MIN_RATIO, flow.ratio + _LEARN * (ratio - flow.ratio)))
        self.order(flow)  # a lag from waiting (capped, blocked) is not credit: drop it first
        flow.pass_ += (used - charged) / weight
        flow.credit = max(0.0, self._vtime.get(flow.pool, 0.0) - flow.pass_)
