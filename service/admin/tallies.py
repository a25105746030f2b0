"""What the console shows over time: spend per day and month by model, dead letters per hour.

The gateway's Prometheus counters count since the process started. A sampler
reads them every `interval_s` and adds what changed since its last reading to
period buckets:

- spend: per UTC day and month, per (partner, model), in nano-USD;
- dead letters: per minute, per (partner, reason), summed over the last hour.

With a `redis` section the buckets are Redis hashes shared by every replica
(`{prefix}:admin:spend:day:2026-11-24`, `{prefix}:admin:dl:<minute>`, expiring
after their period), so the console shows the whole service and survives
restarts. Without Redis they are this replica's, since it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter as PromCounter
from redis.exceptions import RedisError

from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

NANO = 1_000_000_000
HOUR_MINUTES = 60
_SEP = "|"
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_DAY_TTL_S = 3 * 86_400
_MONTH_TTL_S = 62 * 86_400
_MINUTE_TTL_S = 2 * 3_600


def day_label(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def month_label(ts: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(ts))


def _read(counter: PromCounter, labels: tuple[str, str]) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in counter.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                out[(s.labels[labels[0]], s.labels[labels[1]])] = s.value
    return out


def _field(a: str, b: str) -> str:
    return f"{a}{_SEP}{b}"


def _split(field: bytes | str) -> tuple[str, str]:
    text = field.decode() if isinstance(field, bytes) else field
    a, _, b = text.partition(_SEP)
    return a, b


class Tallies:
    def __init__(
        self,
        metrics: Metrics,
        redis: Any | None = None,
        key_prefix: str = "claude-gateway",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._redis = redis
        self._tag = "{" + key_prefix + "}:admin"
        self._clock = clock
        self._seen_cost: dict[tuple[str, str], float] = {}
        self._seen_dl: dict[tuple[str, str], float] = {}
        self._spend: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
        """`day:<label>` / `month:<label>` -> (partner, model) -> nano-USD (without Redis)."""
        self._dead: dict[int, Counter[tuple[str, str]]] = defaultdict(Counter)
        """minute number -> (partner, reason) -> count (without Redis)."""
        self.store_error: str | None = None

    # -- sampling ---------------------------------------------------------------------------

    def _deltas(
        self, counter: PromCounter, labels: tuple[str, str], seen: dict[tuple[str, str], float]
    ) -> dict[tuple[str, str], float]:
        now = _read(counter, labels)
        out = {k: v - seen.get(k, 0.0) for k, v in now.items() if v > seen.get(k, 0.0)}
        seen.update(now)
        return out

    async def sample(self) -> None:
        """Add what the counters gained since the last call to the period buckets."""
        now = self._clock()
        cost = self._deltas(self._metrics.cost, ("partner", "model"), self._seen_cost)
        dead = self._deltas(self._metrics.dead_letters, ("partner", "reason"), self._seen_dl)
        spend = {k: round(v * NANO) for k, v in cost.items() if round(v * NANO) > 0}
        dl = {k: round(v) for k, v in dead.items()}
        minute = int(now // 60)
        periods = (f"day:{day_label(now)}", f"month:{month_label(now)}")
        if self._redis is not None and (spend or dl):
            try:
                await self._write(periods, minute, spend, dl)
                self.store_error = None
                return
            except _REDIS_ERRORS as exc:
                self._store_failed(exc)
        for period in periods:
            self._spend[period].update(spend)
        self._dead[minute].update(dl)
        for m in [m for m in self._dead if m <= minute - HOUR_MINUTES]:
            del self._dead[m]
        for p in [p for p in self._spend if p not in periods]:
            del self._spend[p]

    async def _write(
        self,
        periods: Iterable[str],
        minute: int,
        spend: dict[tuple[str, str], int],
        dl: dict[tuple[str, str], int],
    ) -> None:
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            for period in periods:
                key = f"{self._tag}:spend:{period}"
                for (pid, model), nusd in spend.items():
                    pipe.hincrby(key, _field(pid, model), nusd)
                pipe.expire(key, _DAY_TTL_S if period.startswith("day:") else _MONTH_TTL_S)
            key = f"{self._tag}:dl:{minute}"
            for (pid, reason), n in dl.items():
                pipe.hincrby(key, _field(pid, reason), n)
            pipe.expire(key, _MINUTE_TTL_S)
            await pipe.execute()

    def _store_failed(self, exc: BaseException) -> None:
        if self.store_error is None:
            log.warning("admin tallies store unreachable; counting here", extra={"error": type(exc).__name__})
        self.store_error = type(exc).__name__

    async def run(self, stop: asyncio.Event, interval_s: float = 5.0) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            await self.sample()

    # -- reading ----------------------------------------------------------------------------

    async def spend(self) -> dict[str, dict[str, dict[str, float]]]:
        """{"today"|"month": {partner: {model: usd}}}."""
        now = self._clock()
        names = {"today": f"day:{day_label(now)}", "month": f"month:{month_label(now)}"}
        out: dict[str, dict[str, dict[str, float]]] = {"today": {}, "month": {}}
        for name, period in names.items():
            rows: dict[tuple[str, str], int] = dict(self._spend.get(period, {}))
            if self._redis is not None:
                with contextlib.suppress(*_REDIS_ERRORS):
                    raw = await self._redis.hgetall(f"{self._tag}:spend:{period}")
                    rows = {_split(k): int(v) for k, v in raw.items()}
            for (pid, model), nusd in rows.items():
                out[name].setdefault(pid, {})[model] = nusd / NANO
        return out

    async def dead_letters_last_hour(self) -> dict[str, dict[str, int]]:
        """{partner: {reason: count}} over the last 60 minutes (this one included)."""
        minute = int(self._clock() // 60)
        minutes = range(minute - HOUR_MINUTES + 1, minute + 1)
        total: Counter[tuple[str, str]] = Counter()
        for m in minutes:
            total.update(self._dead.get(m, {}))
        if self._redis is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for m in minutes:
                        pipe.hgetall(f"{self._tag}:dl:{m}")
                    answers = await pipe.execute()
                total = Counter()
                for raw in answers:
                    for k, v in raw.items():
                        total[_split(k)] += int(v)
        out: dict[str, dict[str, int]] = {}
        for (pid, reason), n in total.items():
            out.setdefault(pid, {})[reason] = n
        return out
