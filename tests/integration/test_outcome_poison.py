"""No record can stop the service, and budgets survive a crash honestly (issue 9).

- A dead letter over its topic's limit while many outcomes are in flight to the same partitions:
  every request still gets its one outcome (no `OutOfOrderSequenceNumber` crash).
- Poison headers end to end: a ~1 MB `tracestate`, a header name that is not UTF-8 (written
  byte for byte): a dead letter each, a response for every good record, the loop goes on.
- kill -9 of a gateway process with most requests queued: the Redis budget ledger holds only
  what was billed or claimed in flight, and a restart finishes everything with no false
  `budget_exhausted`.
"""

from __future__ import annotations

import asyncio
import base64
import math
import signal
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from service.simulator import SimulatorServer
from service.simulator.tokens import count_input_tokens
from tests.support.gateway import collect, committed_offsets, produce, request
from tests.support.outcomes import (
    Message,
    RawHeaders,
    RawName,
    calls_of,
    partners_with,
    send_raw_batch,
    sim_config,
    start_gateway,
    stop_gateway,
    world_with_limits,
)
from tests.support.process import exit_code, start_process
from tests.support.trust import produce_messages

pytestmark = pytest.mark.integration

ONE_CALL = {"ok": 1, "billed": 1, "all": 1}


async def test_an_over_limit_dead_letter_amid_concurrent_sends_gets_its_outcome(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    world = await world_with_limits(
        kafka_bootstrap, tmp_path, ["acme"], deadletter_configs={"max.message.bytes": "100000"}
    )
    t = world.request_topic("acme")
    huge = b'{"request_id": "huge", "params": ' + b"x" * 600_000  # malformed: a dead letter
    good: list[Message] = [(t, f"ok-{i}".encode(), request(f"ok-{i}")) for i in range(150)]
    small_bad: list[Message] = [(t, f"bad-{i}".encode(), b"{bad " + str(i).encode()) for i in range(30)]
    # small dead letters to the same partition just before and after the huge one
    messages: list[Message] = [m for pair in zip(good[:20], small_bad[:20], strict=True) for m in pair]
    messages += [*good[20:90], *small_bad[20:25], (t, b"huge", huge), *small_bad[25:], *good[90:]]
    async with SimulatorServer(sim_config(world)) as sim:
        _, stop, task = await start_gateway(world, sim.url)
        try:
            await produce(world.bootstrap, messages)
            out = await collect(world, len(messages), timeout_s=90, settle_s=2.0)
        finally:
            await stop_gateway(stop, task)
        calls = calls_of(sim, "acme")
    assert sorted(d["request_id"] for d in out.responses) == sorted(f"ok-{i}" for i in range(150))
    assert len(out.dead_letters) == 31
    assert out.reasons() == {"malformed_json": 31}
    keys = sorted(base64.b64decode(d["original"]["key_b64"]) for d in out.dead_letters)
    assert keys == sorted([b"huge", *(f"bad-{i}".encode() for i in range(30))])
    (big,) = [d["original"] for d in out.dead_letters if d["original"]["key_b64"] == "aHVnZQ=="]
    assert (big["truncated"], big["value_size"]) == (True, len(huge))
    assert {rid: c for rid, c in calls.items() if c != ONE_CALL} == {}
    assert len(calls) == 150
    committed = await committed_offsets(world, f"{world.tag}-gateway")
    assert sum(committed.values()) == len(messages)


async def test_poison_headers_get_dead_letters_and_the_loop_goes_on(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    world = await world_with_limits(kafka_bootstrap, tmp_path, ["acme"])
    t = world.request_topic("acme")
    trace = ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    mb_state = ("tracestate", b"v=" + b"a" * 1_000_000)  # the record is over max_request_bytes
    kb_state = ("tracestate", b"v=" + b"b" * 100_000)  # within it: bounded on the response
    async with SimulatorServer(sim_config(world)) as sim:
        limits = partners_with(world, sim.url, acme={"max_request_bytes": 256 * 1024})
        _, stop, task = await start_gateway(world, sim.url, **limits)
        try:
            await produce_messages(
                world.bootstrap,
                [
                    (t, b"g-0", request("g-0"), [trace]),
                    (t, b"state-mb", request("state-mb"), [trace, mb_state]),
                    (t, b"state-kb", request("state-kb"), [trace, kb_state]),
                    (t, b"g-1", request("g-1"), []),
                ],
            )
            bad_name: RawHeaders = [("x-ok", b"1"), (RawName(b"x-\xff\xfe-name"), b"v")]
            await send_raw_batch(
                world.bootstrap,
                t,
                0,
                [
                    (b"g-2", request("g-2"), [("x-ok", b"1")]),
                    (b"name-0", request("name-0"), bad_name),
                    (b"g-3", request("g-3"), []),
                    (b"name-1", request("name-1"), bad_name),
                    (b"g-4", request("g-4"), []),
                ],
            )
            first = await collect(world, 9, timeout_s=60, settle_s=1.0)
            await produce(world.bootstrap, [(t, b"g-5", request("g-5"))])
            out = await collect(world, 10, timeout_s=60, settle_s=1.0)
        finally:
            await stop_gateway(stop, task)
        calls = calls_of(sim, "acme")
    assert (first.total, out.total) == (9, 10)
    assert {rid: c for rid, c in out.request_ids().items() if rid is not None and c != 1} == {}
    by_key = {base64.b64decode(d["original"]["key_b64"]): d for d in out.dead_letters}
    assert sorted(by_key) == [b"name-0", b"name-1", b"state-mb"]
    assert by_key[b"state-mb"]["reason"] == "oversize"
    assert (by_key[b"name-0"]["reason"], by_key[b"name-1"]["reason"]) == ("undecodable_record",) * 2
    assert [by_key[k]["original"]["offset"] for k in (b"name-0", b"name-1")] == [5, 7]
    assert sorted(d["request_id"] for d in out.responses) == [*(f"g-{i}" for i in range(6)), "state-kb"]
    for headers in out.headers:
        assert sum(len(k) + len(v or b"") for k, v in headers) < 4096, [(k, len(v)) for k, v in headers]
    assert {rid: c for rid, c in calls.items() if c != ONE_CALL} == {}
    assert sorted(calls) == [*(f"g-{i}" for i in range(6)), "state-kb"]


async def _tokens_used(redis_url: str, prefix: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        stored = await client.hgetall(f"{{{prefix}}}:budget:acme:day:{day}")
    finally:
        await client.aclose()
    return int(stored.get(b"tokens", 0))


async def test_a_crash_strands_no_queued_budget_reservation(
    kafka_bootstrap: str, tmp_path: Path, redis_url: str
) -> None:
    world = await world_with_limits(kafka_bootstrap, tmp_path, ["acme"])
    n, max_tokens, output_tokens, concurrency = 60, 100, 20, 2
    values = [request(f"b-{i:03d}", max_tokens=max_tokens) for i in range(n)]
    reserve = math.ceil(len(values[0]) / 3.0) + max_tokens  # what one request reserves
    cost = count_input_tokens(orjson.loads(values[0])["params"]) + output_tokens  # what one call bills
    assert reserve > 2 * cost
    budget = n * cost + 4 * reserve  # all calls, plus what in-flight work may hold at any time
    prefix = f"gw-{uuid.uuid4().hex[:8]}"
    cfg = sim_config(
        world, latency={"distribution": "fixed", "fixed_s": 0.4}, output={"fixed_tokens": output_tokens}
    )
    async with SimulatorServer(cfg) as sim:
        budgeted = partners_with(
            world,
            sim.url,
            acme={
                "max_concurrency": concurrency,
                "budget": {"tokens_per_day": budget, "on_exhausted": "deadletter"},
            },
        )
        overrides = {"redis": {"url": redis_url, "key_prefix": prefix}, **budgeted}
        await produce(world.bootstrap, [(world.request_topic("acme"), None, v) for v in values])
        proc = start_process(world, sim.url, tmp_path, **overrides)
        try:
            before = await collect(world, 12, timeout_s=90)
            assert 12 <= before.total < n - 10, "the kill must land with most requests still to do"
        finally:
            proc.send_signal(signal.SIGKILL)
            await exit_code(proc, 10)
        await asyncio.sleep(1.0)  # calls in flight at the kill finish (and bill) on the simulator
        billed_at_kill = sum(c["billed"] for c in calls_of(sim, "acme").values())
        used_at_kill = await _tokens_used(redis_url, prefix)

        restarted = start_process(world, sim.url, tmp_path, **overrides)
        try:
            out = await collect(world, n, timeout_s=120, settle_s=2.0)
        finally:
            restarted.send_signal(signal.SIGTERM)
            assert await exit_code(restarted, 60) == 0
        calls = calls_of(sim, "acme")
        used_final = await _tokens_used(redis_url, prefix)

    stranded = used_at_kill - billed_at_kill * cost  # reservations of work not settled
    print(
        f"\nbudget at kill: {before.total} outcomes, {billed_at_kill} calls billed, "
        f"{used_at_kill} tokens used = billed + {stranded} ({stranded / reserve:.1f} reservations of "
        f"{reserve}); final {used_final} for {len(out.responses)} responses"
    )
    assert 0 <= stranded <= concurrency * reserve, "only work claimed in flight may hold a reservation"
    assert [rid for rid, c in out.request_ids().items() if c != 1] == []
    assert set(out.request_ids()) == {f"b-{i:03d}" for i in range(n)}
    assert "budget_exhausted" not in out.reasons(), out.reasons()
    unknown = {d["request_id"] for d in out.dead_letters}
    assert out.reasons() == ({"outcome_unknown": len(unknown)} if unknown else {})
    assert len(unknown) <= concurrency, "only calls claimed at the kill are unknown"
    assert {rid: c["billed"] for rid, c in calls.items() if c["billed"] > 1} == {}
    responded = {d["request_id"] for d in out.responses}
    assert {rid for rid, c in calls.items() if c["ok"] == 1} >= responded
    assert {d["usage"]["input_tokens"] + d["usage"]["output_tokens"] for d in out.responses} == {cost}
    assert len(out.responses) * cost <= used_final <= len(out.responses) * cost + concurrency * reserve
