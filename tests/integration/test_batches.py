"""The Message Batches path on a real broker, against the simulator's batch API over HTTP.

Every request gets exactly one outcome whatever path it takes, no request is billed in
two batches, and a crash of the worker at each step (after the intent, between the
create and its record, between two result transactions) changes none of that.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio

from service.batches.routing import custom_id
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import (
    Message,
    Outcomes,
    World,
    collect,
    make_world,
    produce,
    request,
    spread,
    trace_context_lost,
    until_no_lag,
    usage_records,
)
from tests.support.outcomes import start_gateway, stop_gateway
from tests.support.process import exit_code, start_process, stop_process

pytestmark = pytest.mark.integration

MODELS = ("claude-haiku-4-5", "claude-opus-4-1")


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex"])


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def _batches(world: World, **kw: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "pending_topic": f"{world.tag}.gateway.batch-pending",
        "state_topic": f"{world.tag}.gateway.batch-state",
        "max_age_s": 0.5,
        "expected_turnaround_s": 5,
        "margin_s": 1,
        "poll_min_s": 0.2,
        "poll_max_s": 1,
        "realtime_reserve_s": 2,
        **kw,
    }


def _sim(world: World, **batches: Any) -> SimulatorConfig:
    return SimulatorConfig.model_validate(
        {"api_keys": world.keys, "seed": 11, "batches": {"processing_s": 1.0, **batches}}
    )


def _mixed(
    world: World, n: int, prefix: str
) -> tuple[list[tuple[str, bytes | None, bytes | None]], dict[str, str]]:
    """Requests as partners send them: several models and sizes, and every urgency:
    batch, auto with a distant deadline (batch), auto with a near one (real time), realtime."""
    now = time.time()
    out: list[tuple[str, bytes | None, bytes | None]] = []
    expected: dict[str, str] = {}
    for i in range(n):
        rid = f"{prefix}-{i}"
        partner = world.partners[i % 2]
        text = "word " * (5 + (i * 37) % 400)
        kind = i % 4
        extra: dict[str, Any] = {
            0: {"service_class": "batch"},
            1: {"service_class": "auto", "respond_by": _iso(now + 7200)},
            2: {"service_class": "auto", "respond_by": _iso(now + 3)},
            3: {"service_class": "realtime"},
        }[kind]
        expected[rid] = "batch" if kind in (0, 1) else "realtime"
        body = request(rid, model=MODELS[i % 2], max_tokens=16 + (i % 5) * 40, **extra)
        body = body.replace(b'"Hello"', b'"' + text.encode() + b'"')
        if i % 3:  # a key that acts on several workspaces, on behalf of users (sent as headers)
            doc = orjson.loads(body)
            doc["params"]["workspace_id"] = f"wrkspc_0{i % 3}"
            if i % 5 == 0:
                doc["params"]["user_profile_id"] = f"uprof_0{i % 2}"
            body = orjson.dumps(doc)
        out.append((world.request_topic(partner), rid.encode(), body))
    return out, expected


def _exactly_once(out: Outcomes, ids: set[str], sim: SimulatorServer, world: World) -> None:
    counts = out.request_ids()
    assert set(counts) == ids, (
        f"lost: {sorted(ids - set(counts))[:5]}, unknown: {sorted(set(counts) - ids)[:5]}"
    )
    assert max(counts.values()) == 1, f"published twice: {[r for r, c in counts.items() if c > 1][:5]}"
    calls = sim.calls()
    by_custom = calls["batch_calls_by_custom_id"]
    twice = {c: v for c, v in by_custom.items() if v.get("billed", 0) > 1}
    assert twice == {}, f"billed in two batches: {list(twice)[:5]}"
    for rid in ids:  # never billed both in a batch and in real time
        partner = next(p for p in world.partners if p == _partner_of(out, rid))
        in_batch = by_custom.get(custom_id(partner, rid), {}).get("billed", 0)
        realtime = calls["calls_by_request"].get(f"{partner}:{rid}", {}).get("billed", 0)
        assert in_batch + realtime <= 1, (rid, in_batch, realtime)


def _partner_of(out: Outcomes, rid: str) -> str:
    for d in out.responses + out.dead_letters:
        if d.get("request_id") == rid:
            return str(d["partner"])
    raise AssertionError(rid)


async def test_requests_take_the_path_their_urgency_allows_and_get_one_answer(world: World) -> None:
    n = 80
    messages, expected = _mixed(world, n, "mx")
    async with SimulatorServer(_sim(world)) as sim:
        _, stop, task = await start_gateway(world, sim.url, batches=_batches(world))
        try:
            await produce(world.bootstrap, messages)
            out = await collect(world, n, timeout_s=90, settle_s=2.0)
            # idle: the batch worker's group has passed the marker after the last handoff
            lag = await until_no_lag(world, f"{world.tag}-gateway.batches", _batches(world)["pending_topic"])
        finally:
            await stop_gateway(stop, task)
        _exactly_once(out, set(expected), sim, world)
        stats = sim.stats()
    assert lag, "the batch worker's group committed nothing"
    assert set(lag.values()) == {0}, f"the batch worker's lag while idle: {lag}"
    assert out.dead_letters == [], out.reasons()
    served = {r["request_id"]: (r.get("served_by") or {}).get("path", "realtime") for r in out.responses}
    assert served == expected, "auto follows the deadline, batch and realtime are obeyed"
    for r in out.responses:
        tier = r["usage"].get("service_tier")
        assert (tier == "batch") == (served[r["request_id"]] == "batch"), r["usage"]
        if served[r["request_id"]] == "batch":
            assert r["served_by"]["batch_id"].startswith("msgbatch_")
    batched = sum(v == "batch" for v in expected.values())
    assert stats["batches"]["request_counts"]["succeeded"] == batched, stats["batches"]


async def test_expired_and_errored_entries_end_once_by_deadline(world: World) -> None:
    """A third of entries never finish (expired), a fifth error: with time left they go to
    real time or a new batch; with none they are dead-lettered, each exactly once."""
    now = time.time()
    n = 60
    messages = []
    ids: set[str] = set()
    for i in range(n):
        rid = f"ex-{i}"
        ids.add(rid)
        # every third request's deadline leaves no time once its batch expired
        respond_by = now + (2.5 if i % 3 == 0 else 3600)
        body = request(rid, model=MODELS[i % 2], service_class="batch", respond_by=_iso(respond_by))
        messages.append((world.request_topic(world.partners[i % 2]), None, body))
    async with SimulatorServer(_sim(world, expiry_s=3.0, expire_rate=0.34, api_error_rate=0.2)) as sim:
        _, stop, task = await start_gateway(world, sim.url, batches=_batches(world, realtime_reserve_s=1))
        try:
            await produce(world.bootstrap, messages)
            out = await collect(world, n, timeout_s=120, settle_s=2.0)
        finally:
            await stop_gateway(stop, task)
        _exactly_once(out, ids, sim, world)
    reasons = out.reasons()
    assert set(reasons) <= {"batch_expired", "retries_exhausted"}, reasons
    assert reasons["batch_expired"] > 0, "some expired with no time left"
    paths = Counter((r.get("served_by") or {}).get("path", "realtime") for r in out.responses)
    assert paths["realtime"] > 0, "expired or errored with time left were served in real time"
    assert paths["batch"] > 0


@pytest.mark.parametrize(
    "failpoint",
    [
        pytest.param("batch.intent:1", marks=pytest.mark.long),  # make chaos runs these two
        "batch.created:1",
        pytest.param("batch.published:2", marks=pytest.mark.long),
    ],
)
async def test_a_worker_killed_at_each_step_submits_nothing_twice(
    world: World, tmp_path: Path, failpoint: str
) -> None:
    n = 40
    ids = {f"k-{i}" for i in range(n)}
    messages = spread(world, n, "k", service_class="batch")  # mixed sizes, models, content, headers
    batches = _batches(world, results_chunk=3, create_timeout_s=2, create_grace_s=0.5, max_age_s=1.0)
    async with SimulatorServer(_sim(world, processing_s=2.0)) as sim:
        await produce(world.bootstrap, messages)
        crashing = start_process(
            world, sim.url, tmp_path, "crashing", env={"GATEWAY_FAILPOINT": failpoint}, batches=batches
        )
        assert await exit_code(crashing, 120) == 137, "the failpoint must have fired"
        restarted = start_process(world, sim.url, tmp_path, "restarted", batches=batches)
        try:
            out = await collect(world, n, timeout_s=120, settle_s=2.0)
        finally:
            await stop_process(restarted)
        _exactly_once(out, ids, sim, world)
    assert out.dead_letters == [], out.reasons()
    assert all((r.get("served_by") or {}).get("path") == "batch" for r in out.responses)
    assert trace_context_lost(messages, out) == [], "a batch outcome lost its request's trace context"


@pytest.mark.parametrize("failpoint", ["batch.settled:2", "batch.published:2"])
async def test_a_worker_killed_around_a_results_transaction_counts_each_budget_once(
    world: World, tmp_path: Path, redis_url: str, failpoint: str
) -> None:
    """Killed after a chunk of results settled the budget but before their transaction, or
    after the transaction: the restarted worker publishes the chunk (again) and the partner's
    budget in Redis ends equal to the metering records, to the nano-USD. (Settled after the
    transaction, a kill between the two left the chunk at its batch-price estimate for good.)"""
    n = 24
    ids = {f"s-{i}" for i in range(n)}
    messages = spread(world, n, "s", service_class="batch")
    prefix = f"t-{world.tag}"
    budget = {"usd_per_month": 1000}
    overrides: dict[str, Any] = {
        "batches": _batches(world, results_chunk=3, max_age_s=1.0),
        "redis": {"url": redis_url, "key_prefix": prefix},
        "partners": [{**p, "budget": budget} for p in world.settings_dict("x")["partners"]],
    }
    async with SimulatorServer(_sim(world, processing_s=1.0)) as sim:
        await produce(world.bootstrap, messages)
        crashing = start_process(
            world, sim.url, tmp_path, "crashing", env={"GATEWAY_FAILPOINT": failpoint}, **overrides
        )
        assert await exit_code(crashing, 120) == 137, "the failpoint must have fired"
        restarted = start_process(world, sim.url, tmp_path, "restarted", **overrides)
        try:
            out = await collect(world, n, timeout_s=120, settle_s=2.0)
            records = await usage_records(world, n)
        finally:
            await stop_process(restarted)
        _exactly_once(out, ids, sim, world)
    assert out.dead_letters == [], out.reasons()
    assert len(records) == n
    client = redis.asyncio.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match="{" + prefix + "}:budget:*:month:*")]
        ledger_nano = sum([int(await client.hget(k, "nusd") or 0) for k in keys])
    finally:
        await client.aclose()
    assert len(keys) == len(world.partners)
    assert ledger_nano == sum(r["cost"]["nano_usd"] for r in records)


async def test_recovery_never_takes_an_earlier_batch_of_the_same_size_for_a_lost_create(
    world: World, tmp_path: Path
) -> None:
    """A batch of 4 is answered and done; then 4 more, and the worker dies between their
    create and its record. The done batch has the same size and was created a moment
    before: recovery must take the new one, not it (the members would be billed in their
    own batch and again in real time)."""
    batches = _batches(world, create_timeout_s=2, create_grace_s=0.5, max_age_s=0.5)
    first = {f"b-{i}" for i in range(4)}
    second = {f"c-{i}" for i in range(4)}

    def batch_of(prefix: str) -> list[Message]:  # one partner's, as partners send them
        topic = world.request_topic("acme")
        return [(topic, *m[1:]) for m in spread(world, 4, prefix, service_class="batch")]

    async with SimulatorServer(_sim(world, processing_s=0.5)) as sim:
        await produce(world.bootstrap, batch_of("b"))
        gateway = start_process(world, sim.url, tmp_path, "first", batches=batches)
        try:
            answered = await collect(world, 4, timeout_s=60)
        finally:
            gateway.terminate()
            await exit_code(gateway, 60)
        assert answered.total == 4
        await produce(world.bootstrap, batch_of("c"))
        crashing = start_process(
            world,
            sim.url,
            tmp_path,
            "crashing",
            env={"GATEWAY_FAILPOINT": "batch.created:1"},
            batches=batches,
        )
        assert await exit_code(crashing, 120) == 137, "the failpoint must have fired"
        restarted = start_process(world, sim.url, tmp_path, "restarted", batches=batches)
        try:
            out = await collect(world, 8, timeout_s=90, settle_s=2.0)
        finally:
            restarted.terminate()
            await exit_code(restarted, 60)
        _exactly_once(out, first | second, sim, world)
    assert all((r.get("served_by") or {}).get("path") == "batch" for r in out.responses), "none fell back"
    assert len({r["served_by"]["batch_id"] for r in out.responses}) == 2
    log = (tmp_path / "restarted.log").read_text()
    assert '"outcome":"found"' in log, "the lost create was found, not made again"
