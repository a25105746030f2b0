"""A Redis that loses the gateway's data (restarted without persistence, flushed), on a
redis-server of the test's own: two replicas, each with its own view of Redis' health and
data epoch, as two gateway processes have.

Each test fails without the epoch (`service/config/redis_epoch.py`): the budgets restarted
from zero, a copy of an answered request passed the other replica, a paused partner resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.admin.pauses import Pauses, new_hold
from service.admission.budget import Budgets, RedisLedger
from service.admission.replay import LocalReplayStore, Origin, RedisReplayStore, ReplayGuard
from service.config.loader import parse_config
from service.config.redis import redis_client
from service.config.redis_epoch import RedisEpoch
from service.config.redis_health import RedisHealth
from service.config.settings import RedisSettings
from tests.support.polling import until
from tests.support.redis import free_port, redis_server
from tests.support.spend import DAY_KEY, NOON, budgeted_registry, spend

pytestmark = pytest.mark.integration

T0 = 1_800_000_000_000


class _Server:
    """A redis-server on a fixed port that can be restarted empty."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._port = free_port()
        self._stack = contextlib.ExitStack()
        self.url = self._stack.enter_context(redis_server(workdir / "0", port=self._port))
        self._restarts = 0

    def restart_empty(self) -> None:
        self._stack.close()
        self._restarts += 1
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(redis_server(self._workdir / str(self._restarts), port=self._port))

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    if os.environ.get("REDIS_URL"):
        pytest.skip("needs a redis-server of its own (REDIS_URL points at a shared one)")
    s = _Server(tmp_path)
    yield s
    s.close()


@dataclass
class _Replica:
    """What one gateway process holds of Redis: a client, its health, its epoch."""

    client: aioredis.Redis
    health: RedisHealth
    epoch: RedisEpoch


@contextlib.asynccontextmanager
async def _replicas(url: str, n: int = 2) -> AsyncIterator[tuple[str, list[_Replica]]]:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    out = []
    for _ in range(n):
        client = redis_client(RedisSettings(url=url, key_prefix=prefix, timeout_s=0.5))
        epoch = RedisEpoch(client, "{" + prefix + "}:epoch", grace_s=0.5, watch_interval_s=0.1)
        health = RedisHealth(client, probe_interval_s=0.1, probe_key="{" + prefix + "}:health", epoch=epoch)
        out.append(_Replica(client, health, epoch))
    try:
        for r in out:
            await r.health.start()
        yield prefix, out
    finally:
        for r in out:
            await r.health.aclose()
            await r.client.aclose()


@pytest.mark.parametrize("how", ["restarted", "flushed"])
async def test_budget_spend_survives_redis_losing_its_data(
    server: _Server, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Spend counted before the loss is written back by the replicas that read it, the highest
    copy winning, and spend after it is added on top (before: the counters restarted at 0)."""
    registry = budgeted_registry()
    # bounded, so that a hang (one CI run of 1533 tests: 300 s, no trace of where) names the
    # await it is in; the admin client's reads are bounded too
    async with asyncio.timeout(90), _replicas(server.url) as (prefix, (a, b)):
        budgets = [
            Budgets(
                lambda: registry,
                shared=RedisLedger(r.client, prefix, clock=lambda: NOON, epoch=r.epoch),
                health=r.health,
                clock=lambda: NOON,
            )
            for r in (a, b)
        ]
        for r, bud in zip((a, b), budgets, strict=True):
            r.epoch.on_lost("budget counters", bud.write_back)
        billed = await spend(budgets[0], registry, 5)
        billed += await spend(budgets[1], registry, 2)  # b read the total last: 2,100
        admin = aioredis.Redis.from_url(server.url, socket_timeout=10, socket_connect_timeout=10)
        key = "{" + prefix + "}:" + DAY_KEY
        try:
            assert int(await admin.hget(key, "tokens") or 0) == billed
            if how == "restarted":
                server.restart_empty()
                await admin.aclose()
                admin = aioredis.Redis.from_url(server.url, socket_timeout=10, socket_connect_timeout=10)
            else:
                await admin.flushall()
            with caplog.at_level(logging.ERROR, logger="service.config.redis_epoch"):
                billed += await spend(budgets[0], registry, 1)  # a goes on (a's copy: 1,500)
                await until(lambda: a.epoch.losses == 1 and b.epoch.losses == 1, 10)
                await until(lambda: not (a.health.down or b.health.down or budgets[0].outage), 10)
            assert int(await admin.hget(key, "tokens") or 0) == billed, "the spend before the loss is gone"
            assert [r.message for r in caplog.records].count(caplog.records[0].message) == 2
            assert "redis lost the gateway's data" in caplog.records[0].message
            billed += await spend(budgets[1], registry, 1)
            assert int(await admin.hget(key, "tokens") or 0) == billed
        finally:
            await admin.aclose()


async def test_a_copy_of_an_answered_request_is_refused_by_the_other_replica_after_a_flush(
    server: _Server,
) -> None:
    """Replica a answered r1; Redis is emptied; a copy of r1 reaches replica b, which has never
    seen it: b waits for a's sightings to be written back and refuses it (before: answered and
    billed again)."""
    ps = parse_config(
        {"partners": [{"id": "acme", "api_key": {"env": "K"}, "dedupe": True, "replay_window_s": 600}]}
    ).partners[0]
    async with _replicas(server.url) as (prefix, (a, b)):
        guards = [
            ReplayGuard(LocalReplayStore(), RedisReplayStore(r.client, prefix, r.epoch), health=r.health)
            for r in (a, b)
        ]
        for r, guard in zip((a, b), guards, strict=True):
            r.epoch.on_lost("replay sightings", guard.write_back)
        assert await guards[0].first_seen(ps, "r1", Origin("t", 0, 9), appended_ms=T0) is None
        for i in range(3):  # b has checked others: it knows the epoch
            assert await guards[1].first_seen(ps, f"o{i}", Origin("t", 1, i), appended_ms=T0 + i) is None
        admin = aioredis.Redis.from_url(server.url)
        try:
            await admin.flushall()
        finally:
            await admin.aclose()
        copy = await guards[1].first_seen(ps, "r1", Origin("t", 1, 50), appended_ms=T0 + 600)
        assert copy == "t/0/9", "a copy of an answered request passed after redis lost its data"
        assert await guards[0].first_seen(ps, "o1", Origin("t", 0, 70), appended_ms=T0 + 700) == "t/1/1"
        assert (a.epoch.losses, b.epoch.losses) == (1, 1)


async def test_a_paused_partner_stays_paused_when_redis_loses_its_data(server: _Server) -> None:
    async with _replicas(server.url) as (prefix, (a, b)):
        pauses = [Pauses(r.client, prefix, r.epoch) for r in (a, b)]
        for r, p in zip((a, b), pauses, strict=True):
            r.epoch.on_lost("pauses", p.write_back)
        await pauses[0].set("acme", new_hold("paused", "oncall", "replica-a"))
        await pauses[1].sync()
        assert set(pauses[1].holds) == {"acme"}
        server.restart_empty()
        for _ in range(3):
            await pauses[1].sync()
        assert set(pauses[1].holds) == {"acme"}, "a paused partner resumed when redis lost its data"
        await until(lambda: a.epoch.losses == 1, 10)
        await pauses[1].set("acme", None)  # and a resume after it still works for both
        await pauses[0].sync()
        assert not pauses[0].holds


async def test_a_replica_starting_on_an_empty_or_a_kept_redis_reports_no_loss(server: _Server) -> None:
    async with _replicas(server.url, n=1) as (prefix, (a,)):
        assert a.epoch.value is not None  # created by the first replica: nothing was lost
        b_epoch = RedisEpoch(a.client, "{" + prefix + "}:epoch")
        await b_epoch.check()
        assert b_epoch.value == a.epoch.value
        await a.epoch.check()
        assert (a.epoch.losses, b_epoch.losses) == (0, 0)


async def test_a_write_back_that_redis_interrupts_is_done_again_and_the_loss_counted_once(
    server: _Server,
) -> None:
    async with _replicas(server.url, n=1) as (prefix, (a,)):
        calls: list[str] = []

        async def flaky() -> int:
            calls.append("write back")
            if len(calls) == 1:
                raise ConnectionError("redis went away mid-restore")
            await a.client.set("{" + prefix + "}:restored", "1")
            return 1

        a.epoch.on_lost("flaky", flaky)
        await a.health.aclose()  # no watch: this test drives the checks
        before = a.epoch.value
        admin = aioredis.Redis.from_url(server.url)
        try:
            await admin.flushall()
            with pytest.raises(ConnectionError):
                await a.epoch.check()
            assert a.epoch.value == before, "an unfinished recovery adopted the new epoch"
            await a.epoch.check()
            assert await admin.get("{" + prefix + "}:restored") == b"1"
            assert a.epoch.value not in (None, before)
            assert (a.epoch.losses, len(calls)) == (1, 2)
            await a.epoch.check()  # and nothing more once recovered
            assert (a.epoch.losses, len(calls)) == (1, 2)
        finally:
            await admin.aclose()
