"""Issue 12, dead-letter replay, on the real broker: `claude-gateway dlq show|replay` as a process.

A signed partner's requests are dead-lettered (`budget_exhausted`: its budget was too small);
once the budget is raised, and long after their signatures went stale and while their
request ids are still remembered by the replay check:

- the dead letters carry Spring-style headers naming the original record and the failure;
- `dlq show` counts them; `dlq replay --dry-run` says what it would do and produces nothing;
- `dlq replay` re-produces each exactly once, operator-signed: the gateway accepts them
  through its signature and replay checks and answers each with one response;
- a dead letter whose request already has a response is never replayed;
- a second `dlq replay` replays nothing; a verbatim copy of a replayed record is a `replay`
  dead letter; a partner's own forged replay header is refused (`bad_signature`).
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from claude_gateway_client.signing import sign

from service.app import Gateway
from service.config.loader import parse_config
from service.contracts.operator_replay import HEADER as REPLAY_HEADER
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, collect, make_world, request

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SIGNING_SECRET = "partner-signing-secret-0123456789"
OPERATOR_SECRET = "operator-replay-secret-9876543210"


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme"], partitions=2)


def _config(world: World, sim_url: str, tokens_per_day: int | None) -> dict[str, Any]:
    (world.key_dir / "acme.sign").write_text(SIGNING_SECRET)
    (world.key_dir / "operator.key").write_text(OPERATOR_SECRET)
    acme = world.settings_dict(sim_url)["partners"][0]
    acme["signing"] = {
        "required": True,
        "keys": {"k1": {"file": str(world.key_dir / "acme.sign")}},
        "max_skew_s": 1,
    }
    acme["replay_window_s"] = 600
    if tokens_per_day is not None:
        acme["budget"] = {"tokens_per_day": tokens_per_day}
    return world.settings_dict(
        sim_url,
        partners=[acme],
        operator_replay={"keys": {"ops1": {"file": str(world.key_dir / "operator.key")}}},
    )


@asynccontextmanager
async def running(cfg: dict[str, Any]) -> AsyncIterator[Gateway]:
    gateway = Gateway(parse_config(cfg))
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        for _ in range(600):
            if task.done():
                task.result()
            if len(gateway.ingest.ownership.ready) == 2:
                break
            await asyncio.sleep(0.1)
        yield gateway
    finally:
        stop.set()
        await task


async def _send(world: World, messages: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=world.bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers in messages:
            await producer.send_and_wait(world.request_topic("acme"), value, key=key, headers=headers)
    finally:
        await producer.stop()


def _signed(world: World, rid: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    value = request(rid)
    headers = sign(world.request_topic("acme"), rid.encode(), value, rid, key_id="k1", secret=SIGNING_SECRET)
    return rid.encode(), value, [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"), *headers]


async def cli(cfg_file: Path, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "dlq",
        *args,
        "--config",
        str(cfg_file),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    lines = [orjson.loads(line) for line in out.decode().splitlines() if line.strip()]
    return proc.returncode or 0, lines, err.decode()


async def _dead_letter_records(world: World) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=world.bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(world.deadletter_topic("acme"), p) for p in range(2)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = []
        for _ in range(20):
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def test_dead_letters_are_replayed_once_and_never_when_answered(world: World, tmp_path: Path) -> None:
    sim_cfg = SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 5})
    async with SimulatorServer(sim_cfg) as sim:
        # 1. a budget too small for any request: three dead letters `budget_exhausted`
        async with running(_config(world, sim.url, tokens_per_day=10)):
            await _send(world, [_signed(world, f"r-{i}") for i in range(3)])
            first = await collect(world, expected=3, timeout_s=60)
        assert first.reasons() == {"budget_exhausted": 3}

        records = await _dead_letter_records(world)
        assert len(records) == 3
        for rec in records:
            h = dict(rec.headers)
            doc = orjson.loads(rec.value)
            assert h["kafka_dlt-original-topic"].decode() == doc["original"]["topic"]
            assert struct.unpack(">i", h["kafka_dlt-original-partition"])[0] == doc["original"]["partition"]
            assert struct.unpack(">q", h["kafka_dlt-original-offset"])[0] == doc["original"]["offset"]
            assert (
                struct.unpack(">q", h["kafka_dlt-original-timestamp"])[0] == doc["original"]["timestamp_ms"]
            )
            assert h["kafka_dlt-exception-fqcn"] == b"claude_gateway.reasons.budget_exhausted"
            assert h["kafka_dlt-exception-message"].decode() == doc["detail"]
            assert h["gateway-reason"] == b"budget_exhausted"

        # r-2 got its answer some other way: it must never be replayed
        producer = AIOKafkaProducer(bootstrap_servers=world.bootstrap, acks="all")
        await producer.start()
        await producer.send_and_wait(world.response_topic("acme"), b"{}", key=b"r-2")
        await producer.stop()

        cfg_file = tmp_path / "gateway.yaml"
        cfg = _config(world, sim.url, tokens_per_day=None)
        cfg_file.write_text(yaml.safe_dump(cfg))

        code, lines, err = await cli(cfg_file, "show")
        assert code == 0, err
        assert lines[0]["by_partner"] == {"acme": {"budget_exhausted": 3}}
        assert lines[0]["replayable_originals"] == 3

        code, lines, err = await cli(cfg_file, "replay", "--dry-run")
        assert code == 0, err
        planned = {(d["action"], d["request_id"], d.get("why")) for d in lines if "action" in d}
        assert planned == {
            ("would_replay", "r-0", None),
            ("would_replay", "r-1", None),
            ("skipped", "r-2", "has_response"),
        }
        assert lines[-1]["summary"]["replayed"] == 0

        await asyncio.sleep(1.5)  # the partner's signatures (max_skew_s 1) are stale by now
        async with running(cfg):
            code, lines, err = await cli(cfg_file, "replay")
            assert code == 0, err
            assert sorted(d["request_id"] for d in lines if d.get("action") == "replayed") == ["r-0", "r-1"]
            assert lines[-1]["summary"] == {
                "dry_run": False,
                "considered": 3,
                "replayed": 2,
                "skipped": {"has_response": 1},
            }
            second = await collect(world, expected=6, timeout_s=60, settle_s=2)
            answered = sorted(d["request_id"] for d in second.responses if d.get("message"))
            assert answered == ["r-0", "r-1"]
            assert second.reasons() == {"budget_exhausted": 3}

            # again: nothing left to replay
            code, lines, err = await cli(cfg_file, "replay")
            assert code == 0, err
            assert lines[-1]["summary"]["replayed"] == 0
            assert lines[-1]["summary"]["skipped"] == {"has_response": 3}

            # a verbatim copy of a replayed record, and a partner's forged replay header
            replayed = await _replayed_records(world)
            assert len(replayed) == 2
            copy = replayed[0]
            key, value, headers = _signed(world, "r-forged")
            headers.append((REPLAY_HEADER, b"ops1:1700000000000:x/0/1:" + b"0" * 64))
            await _send(world, [(copy.key, copy.value, list(copy.headers)), (key, value, headers)])
            third = await collect(world, expected=8, timeout_s=60, settle_s=2)
        late = {d["request_id"]: d["reason"] for d in third.dead_letters if d["reason"] != "budget_exhausted"}
        assert late == {orjson.loads(copy.value)["request_id"]: "replay", "r-forged": "bad_signature"}
        assert sorted(d["request_id"] for d in third.responses if d.get("message")) == ["r-0", "r-1"]


async def _replayed_records(world: World) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=world.bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(world.request_topic("acme"), p) for p in range(2)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out = []
        for _ in range(20):
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                out += [r for r in batch if any(k == REPLAY_HEADER for k, _ in r.headers)]
        return out
    finally:
        await consumer.stop()


async def test_a_partners_forged_replay_mark_does_not_hide_its_dead_letters(
    world: World, tmp_path: Path
) -> None:
    """A partner writes its own request topic, with any header and any record timestamp: a
    record carrying a made-up replay mark, written after a dead letter, made `dlq replay` skip
    that dead letter as `already_replayed` (only marks the operators' keys verify count)."""
    sim_cfg = SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 1})
    async with SimulatorServer(sim_cfg) as sim:
        cfg = _config(world, sim.url, tokens_per_day=1)
        cfg_file = tmp_path / "gateway.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        async with running(cfg):
            await _send(world, [_signed(world, "victim-1"), _signed(world, "victim-2")])
            first = await collect(world, expected=2, timeout_s=60)
            assert first.reasons() == {"budget_exhausted": 2}
            producer = AIOKafkaProducer(bootstrap_servers=world.bootstrap, acks="all")
            await producer.start()
            try:
                forged = [(REPLAY_HEADER, b"ops1:1:x/0/0:" + b"0" * 64)]
                await producer.send_and_wait(world.request_topic("acme"), request("victim-1"), headers=forged)
            finally:
                await producer.stop()
            await collect(world, expected=3, timeout_s=30)
        code, lines, err = await cli(cfg_file, "replay", "--dry-run")
    assert code == 0, err
    planned = {d["request_id"]: d["action"] for d in lines if "action" in d}
    assert planned == {"victim-1": "would_replay", "victim-2": "would_replay"}
