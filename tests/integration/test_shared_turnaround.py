"""Batch turnarounds shared between replicas through a real Redis: a replica whose worker saw
no batch end routes `auto` requests by what another replica's worker saw, not by the prior."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from service.batches.routing import Router, Turnaround, Urgency
from service.batches.shared_turnaround import SharedTurnarounds
from service.config.loader import parse_config

pytestmark = pytest.mark.integration

NOW = 1_796_083_200.0


def _settings() -> object:
    batches = {"enabled": True, "expected_turnaround_s": 600, "margin_s": 60, "turnaround_factor": 1.5}
    return parse_config({"batches": batches, "partners": []}).batches


async def test_a_replica_routes_by_the_turnarounds_another_replica_observed(redis_url: str) -> None:
    s = _settings()
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    worker, other = Router(Turnaround(s)), Router(Turnaround(s))  # type: ignore[arg-type]
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        a = SharedTurnarounds(clients[0], prefix, worker.turnaround)
        b = SharedTurnarounds(clients[1], prefix, other.turnaround)
        auto_2h = Urgency("auto", NOW + 7200)
        assert other.route(s, auto_2h, NOW) == "batch"  # the prior: 600 s
        for i in range(25):  # the real batches take about 2 h
            worker.turnaround.observe(7000.0 + i)
        await a.sync()
        await b.sync()
        assert other.turnaround.expected(s) >= 7000  # type: ignore[arg-type]
        assert other.route(s, auto_2h, NOW) == "realtime", "a batch would end after its deadline"
        # the list is capped, and what a replica pushes is not pushed twice
        for _ in range(3):
            await a.sync()
        assert await clients[0].llen(a.key) == 25
        for i in range(60):
            worker.turnaround.observe(100.0 + i)
        await a.sync()
        assert await clients[0].llen(a.key) == worker.turnaround.keep
        await b.sync()
        assert other.route(s, auto_2h, NOW) == "batch"  # they became fast again
    finally:
        for c in clients:
            await c.aclose()


async def test_without_redis_a_replica_keeps_its_own_observations_and_pushes_them_later() -> None:
    s = _settings()
    router = Router(Turnaround(s))  # type: ignore[arg-type]
    down = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        shared = SharedTurnarounds(down, "t-down", router.turnaround)
        for i in range(25):
            router.turnaround.observe(7000.0 + i)
        await asyncio.wait_for(shared.sync(), 5)
        assert router.turnaround.expected(s) >= 7000  # type: ignore[arg-type]
        assert len(router.turnaround.take_unshared()) == 25, "kept for the next sync"
    finally:
        await down.aclose()
