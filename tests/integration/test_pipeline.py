"""End to end on the real broker: partner requests in, responses and dead letters out.

The Claude side is the project's simulator over real HTTP (ANTHROPIC.md facts:
429 carries retry-after; 500/529 are retryable; 401/404 are not).
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from service.app import Gateway
from service.contracts.schemas import validate
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, collect, committed_offsets, make_world, produce, request, spread

pytestmark = pytest.mark.integration


async def _run_gateway(
    world: World, sim_url: str, **overrides: object
) -> tuple[Gateway, asyncio.Event, asyncio.Task[None]]:
    gateway = Gateway(world.settings(sim_url, **overrides), serve_http=False)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    return gateway, stop, task


@pytest.fixture
async def three(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex", "initech"])


def _sim_config(world: World, **kw: object) -> SimulatorConfig:
    return SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 7, **kw})


@pytest.fixture
async def sim(three: World) -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(
        _sim_config(three, faults={"api_error_rate": 0.05, "overloaded_rate": 0.05})
    ) as s:
        yield s


async def test_thousand_requests_from_three_partners_each_get_exactly_one_outcome(
    three: World, sim: SimulatorServer
) -> None:
    rng = random.Random(1)
    messages: list[tuple[str, bytes | None, bytes | None]] = []
    bad = 0
    for i in range(1000):
        p = three.partners[i % 3]
        rid = f"{p}-{i}"
        if rng.random() < 0.05:
            bad += 1
            messages.append(
                (three.request_topic(p), rid.encode(), b'{"request_id": "' + rid.encode() + b'", ')
            )
        else:
            messages.append((three.request_topic(p), rid.encode(), request(rid)))
    _, stop, task = await _run_gateway(three, sim.url)
    try:
        await produce(three.bootstrap, messages)
        out = await collect(three, 1000, timeout_s=180, settle_s=1.0)
    finally:
        stop.set()
        await task
    ids = out.request_ids()
    assert out.total == 1000, f"{out.total} outcomes for 1000 requests"
    assert len(out.responses) == 1000 - bad
    assert out.reasons() == {"malformed_json": bad}
    # each valid request exactly once; malformed ones have no decodable id
    assert all(n == 1 for rid, n in ids.items() if rid is not None)
    assert ids[None] == bad
    for doc in out.responses:
        validate("response", doc)
        assert doc["partner"] == doc["request_id"].split("-")[0]
    for doc in out.dead_letters:
        validate("deadletter", doc)
    # every partner spent its own key, and only its own
    calls = sim.stats()["calls_by_key"]
    assert set(calls) == set(three.partners)
    retried = sum(1 for d in out.responses if d["attempts"] > 1)
    assert retried > 0, "5% 500s and 5% 529s must have caused retries"
    # everything finished, so everything is committed
    committed = await committed_offsets(three, f"{three.tag}-gateway")
    assert sum(committed.values()) == 1000


CODECS = ("gzip", "snappy", "lz4", "zstd")


async def test_requests_in_compressed_batches_are_all_answered_with_compressed_outcomes(
    three: World,
) -> None:
    """Partners' producers compress (Kafka's Java producer and librdkafka offer all four codecs),
    and `values-production.yaml` writes outcomes with `producer_compression: zstd`: every
    request, in batches of each codec, gets its one response; none is dead-lettered as a batch
    that cannot be inflated, and the gateway starts with each codec for its own writes."""
    messages = spread(three, 40 * len(CODECS), "codec")
    async with SimulatorServer(_sim_config(three)) as plain:
        for i, codec in enumerate(CODECS):
            _, stop, task = await _run_gateway(three, plain.url, kafka={"producer_compression": codec})
            try:
                group = messages[i * 40 : (i + 1) * 40]
                await produce(three.bootstrap, group, compression=codec)
                out = await collect(three, (i + 1) * 40, timeout_s=120, settle_s=0.5)
            finally:
                stop.set()
                await task
            assert out.reasons() == {}, f"{codec}: {out.reasons()}"
            assert len(out.responses) == (i + 1) * 40
    assert sorted(out.request_ids()) == sorted(f"codec-{i}" for i in range(40 * len(CODECS)))
    assert set(out.request_ids().values()) == {1}
    assert sum(plain.stats()["calls_by_key"].values()) == 40 * len(CODECS)


async def test_malformed_inputs_are_dead_lettered_with_their_reasons(
    three: World, sim: SimulatorServer
) -> None:
    p = "acme"
    t = three.request_topic(p)
    cases: list[tuple[bytes | None, str]] = [
        (b"{oops", "malformed_json"),
        (b"", "malformed_json"),
        (b'"\xff\xfe\xfd"', "invalid_encoding"),
        (orjson.dumps({"request_id": "s1", "params": {"model": "claude-haiku-4-5"}}), "schema_violation"),
        (orjson.dumps({"params": {}}), "schema_violation"),
        (request("s2", max_tokens=0), "schema_violation"),
        (request("s3", model="gpt-5"), "unknown_model"),
        (request("s4", partner="globex"), "identity_mismatch"),
        (b"{" + b" " * (100 * 1024) + b"}", "oversize"),
    ]
    small = {
        "partners": [{**p, "max_request_bytes": 64 * 1024} for p in three.settings_dict(sim.url)["partners"]]
    }
    _, stop, task = await _run_gateway(three, sim.url, **small)
    try:
        await produce(three.bootstrap, [(t, f"k{i}".encode(), v) for i, (v, _) in enumerate(cases)])
        await produce(three.bootstrap, [(t, b"ok", request("fine-1"))])
        out = await collect(three, len(cases) + 1, settle_s=0.5)
    finally:
        stop.set()
        await task
    assert [d["request_id"] for d in out.responses] == ["fine-1"]
    got = sorted((d["original"]["key_b64"], d["reason"]) for d in out.dead_letters)
    want = sorted((base64.b64encode(f"k{i}".encode()).decode(), r) for i, (_, r) in enumerate(cases))
    assert got == want
    for d in out.dead_letters:
        assert d["detail"]
        assert d["original"]["topic"] == t


async def test_rate_limits_and_server_errors_are_retried_until_success(three: World) -> None:
    # a tiny RPM makes the simulator answer 429 with retry-after; 500/529 injected at 30% each
    cfg = _sim_config(
        three,
        limits={"rpm": 30, "itpm": None, "otpm": None},
        faults={"api_error_rate": 0.3, "overloaded_rate": 0.3},
    )
    async with SimulatorServer(cfg) as sim:
        gateway, stop, task = await _run_gateway(
            three, sim.url, retry={"max_attempts": 30, "base_delay_s": 0.02, "max_delay_s": 0.2}
        )
        try:
            await produce(
                three.bootstrap, [(three.request_topic("globex"), None, request(f"r{i}")) for i in range(36)]
            )
            out = await collect(three, 36)
        finally:
            stop.set()
            await task
        stats = sim.stats()
    assert len(out.responses) == 36, out.reasons()
    assert stats["status_counts"].get("500", 0) > 0
    assert stats["status_counts"].get("529", 0) > 0
    assert stats["status_counts"].get("429", 0) > 0
    assert sum(d["attempts"] for d in out.responses) == stats["calls_total"]
    retries = {
        s.labels["reason"]: s.value
        for m in gateway.metrics.registry.collect()
        if m.name == "gateway_retries"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert {"server_error", "overloaded", "rate_limited"} <= set(retries)


async def test_a_request_bigger_than_a_per_minute_limit_fails_at_once_and_pauses_no_one(
    three: World,
) -> None:
    """ANTHROPIC.md: OTPM is counted from `max_tokens` when a request starts, and a bucket holds
    at most its limit: a request asking for more than the organisation's whole output limit is
    refused (429) at any time. Its 429 must not pause the pool (every partner would wait out
    `retry-after`, 60 s) nor be retried: one call, an `over_rate_limit` dead letter, and the
    other partners' requests answered as if it had not come."""
    cfg = _sim_config(three, limits={"rpm": None, "itpm": None, "otpm": 8_000})
    async with SimulatorServer(cfg) as sim:
        _, stop, task = await _run_gateway(three, sim.url)
        try:
            big = [(three.request_topic("acme"), b"big", request("big", max_tokens=16_000))]
            await produce(three.bootstrap, big)
            first = await collect(three, 1, timeout_s=60)
            sent = time.monotonic()
            ids = [f"{p}-s{i}" for p in ("globex", "initech") for i in range(5)]
            small = [(three.request_topic(rid.split("-")[0]), None, request(rid)) for rid in ids]
            await produce(three.bootstrap, small)
            out = await collect(three, 11, timeout_s=60)
            waited_s = time.monotonic() - sent
        finally:
            stop.set()
            await task
        stats = sim.stats()
    [dead] = first.dead_letters
    validate("deadletter", dead)
    assert (dead["request_id"], dead["reason"], dead["retryable"], dead["attempts"]) == (
        "big",
        "over_rate_limit",
        False,
        1,
    )
    assert "max_tokens (16000)" in dead["detail"], dead["detail"]
    assert "output tokens per minute limit (8000)" in dead["detail"], dead["detail"]
    assert sorted(d["request_id"] for d in out.responses) == sorted(ids)
    assert waited_s < 20, f"the others waited {waited_s:.1f} s: the pool was paused"
    assert stats["status_counts"].get("429") == 1


async def test_non_retryable_upstream_errors_are_dead_lettered(three: World, sim: SimulatorServer) -> None:
    (three.key_dir / "initech.key").write_text("sk-ant-revoked")
    # known to the gateway's price table, unknown upstream -> 404
    models = {
        "claude-haiku-4-5": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 5},
        "claude-retired-1": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 5},
    }
    _, stop, task = await _run_gateway(three, sim.url, models=models)
    try:
        await produce(
            three.bootstrap,
            [
                (three.request_topic("initech"), None, request("auth-1")),
                (three.request_topic("acme"), None, request("nf-1", model="claude-retired-1")),
            ],
        )
        out = await collect(three, 2)
    finally:
        stop.set()
        await task
    by_id = {d["request_id"]: d for d in out.dead_letters}
    assert by_id["auth-1"]["reason"] == "upstream_authentication"
    assert by_id["auth-1"]["upstream"]["status"] == 401
    assert by_id["nf-1"]["reason"] == "upstream_not_found"
    assert by_id["nf-1"]["attempts"] == 1
    assert "sk-ant-revoked" not in orjson.dumps(out.dead_letters).decode()


async def test_dead_letters_fit_a_small_broker_limit_and_huge_keys(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A hostile record must not stop the service: a huge key is replaced by its digest
    on the dead letter, and a dead letter over the topic's size limit is re-sent with
    the original cut (digest and size kept)."""
    world = await make_world(
        kafka_bootstrap, tmp_path, ["acme"], partitions=1, deadletter_configs={"max.message.bytes": "100000"}
    )
    big_value = b'{"request_id": "big", "params": ' + b" " * 300_000 + b"}"
    huge_key = b"k" * 200_000
    async with SimulatorServer(_sim_config(world)) as sim:
        _, stop, task = await _run_gateway(world, sim.url)
        try:
            await produce(
                world.bootstrap,
                [
                    (world.request_topic("acme"), b"big", big_value),
                    (world.request_topic("acme"), huge_key, b"{}"),
                    (world.request_topic("acme"), b"ok", request("after-1")),
                ],
            )
            out = await collect(world, 3)
        finally:
            stop.set()
            await task
    assert not task.exception()
    assert [d["request_id"] for d in out.responses] == ["after-1"]
    by_reason = {d["original"]["offset"]: d for d in out.dead_letters}
    big = by_reason[0]["original"]
    assert big["truncated"]
    assert big["value_size"] == len(big_value)
    assert len(base64.b64decode(big["value_b64"])) == 16 * 1024
    assert by_reason[1]["reason"] == "schema_violation"  # its 200 kB key went out as a digest
