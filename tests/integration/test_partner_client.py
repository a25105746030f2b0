"""The partner client (claude-gateway-client) against the running gateway and the simulator.

- sign, produce, await the correlated outcome: a response, a dead letter, a reused id
  (`replay` of its only record), a wrong secret;
- a request sent again while its first record is being answered: the copy's `replay`
  dead letter comes first, and the client still returns the first record's response;
- a send whose acknowledgement is lost (the record was written) and sent again by the
  caller: the response of the first record, not the copy's `replay`;
- the blocking API, from several threads at once, with the same cases.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError
from claude_gateway_client import DeadLettered, PartnerClient, SyncPartnerClient

from service.app import Gateway
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, make_world

pytestmark = pytest.mark.integration

SECRET = "sig-client-test-0123456789"
PARAMS = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}
LATENCY_S = 1.0  # Claude's answer takes this long; a copy's `replay` dead letter does not


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    (tmp_path / "acme.k1").write_text(SECRET)
    return await make_world(kafka_bootstrap, tmp_path, ["acme"])


@pytest.fixture
async def gateway(world: World) -> AsyncIterator[Gateway]:
    sim_cfg = SimulatorConfig.model_validate(
        {"api_keys": world.keys, "latency": {"distribution": "fixed", "fixed_s": LATENCY_S}}
    )
    async with SimulatorServer(sim_cfg) as sim:
        signing = {"required": True, "keys": {"k1": {"file": str(world.key_dir / "acme.k1")}}}
        cfg = world.settings_dict(sim.url)
        cfg["partners"][0]["signing"] = signing
        cfg["partners"][0]["max_request_bytes"] = 4096
        gw = Gateway(world.settings(sim.url, partners=cfg["partners"]), serve_http=False)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        try:
            for _ in range(600):
                if task.done():
                    task.result()
                if len(gw.ingest.ownership.ready) == world.partitions:
                    break
                await asyncio.sleep(0.1)
            yield gw
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)


def _client(world: World, **kw: Any) -> PartnerClient:
    return PartnerClient(
        world.bootstrap, "acme", key_id="k1", secret=SECRET, topic_prefix=f"{world.tag}.", **kw
    )


async def _outcome_records(
    world: World, request_id: str, expected: int
) -> list[tuple[str, int, dict[str, Any]]]:
    """(topic kind, broker timestamp, document) of every outcome of `request_id`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=world.bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [
            TopicPartition(t, p)
            for t in (world.response_topic("acme"), world.deadletter_topic("acme"))
            for p in range(world.partitions)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[str, int, dict[str, Any]]] = []
        for _ in range(100):
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for r in records:
                    doc = orjson.loads(r.value)
                    if doc.get("request_id") == request_id:
                        out.append(
                            ("deadletter" if ".deadletter." in tp.topic else "response", r.timestamp, doc)
                        )
            if len(out) >= expected:
                break
        return sorted(out, key=lambda o: o[1])
    finally:
        await consumer.stop()


async def _assert_copy_refused_before_the_answer(world: World, request_id: str) -> None:
    """The scenario is real: one response, one `replay` dead letter about a later record,
    and the dead letter was published first (a client taking the first outcome by request
    id alone would have raised it)."""
    outcomes = await _outcome_records(world, request_id, 2)
    assert [(kind, doc.get("reason")) for kind, _, doc in outcomes] == [
        ("deadletter", "replay"),
        ("response", None),
    ], outcomes


async def test_signed_request_gets_its_response_and_a_bad_one_its_dead_letter(
    world: World, gateway: Gateway
) -> None:
    async with _client(world) as c:
        response = await c.request(PARAMS, request_id="client-1", timeout_s=60)
        assert response["request_id"] == "client-1"
        assert response["message"]["role"] == "assistant"
        with pytest.raises(DeadLettered) as caught:
            await c.request({**PARAMS, "model": "gpt-5"}, request_id="client-2", timeout_s=60)
        assert caught.value.reason == "unknown_model"
        with pytest.raises(DeadLettered) as caught:  # the same request id again: a replay
            await c.request(PARAMS, request_id="client-1", timeout_s=60)
        assert caught.value.reason == "replay"
        assert c.pending() == 0
    async with PartnerClient(
        world.bootstrap, "acme", key_id="k1", secret="wrong", topic_prefix=f"{world.tag}."
    ) as c:
        with pytest.raises(DeadLettered) as caught:
            await c.request(PARAMS, request_id="client-3", timeout_s=60)
        assert caught.value.reason == "bad_signature"


async def test_a_request_sent_again_gets_the_first_records_response(world: World, gateway: Gateway) -> None:
    async with _client(world) as c:
        assert c._producer is not None
        assert c._producer._txn_manager is not None, "an idempotent producer (its sequence numbers)"
        waiting = asyncio.create_task(c.request(PARAMS, request_id="dup-1", timeout_s=60))
        await asyncio.sleep(0.3)  # the first record is written and read; Claude is answering
        assert not waiting.done()
        assert await c.send(PARAMS, request_id="dup-1") == "dup-1"  # the caller sends it again
        response = await waiting
        assert response["request_id"] == "dup-1"
        assert response["message"]["role"] == "assistant"
    await _assert_copy_refused_before_the_answer(world, "dup-1")


async def test_a_send_whose_acknowledgement_was_lost_is_sent_again(world: World, gateway: Gateway) -> None:
    async with _client(world) as c:
        producer = c._producer
        assert producer is not None
        real = producer.send_and_wait
        lost: list[int] = []

        async def ack_lost_once(*args: Any, **kw: Any) -> Any:
            meta = await real(*args, **kw)  # written...
            if not lost:
                lost.append(meta.offset)
                raise KafkaTimeoutError("acknowledgement lost")  # ...but the caller never hears of it
            return meta

        producer.send_and_wait = ack_lost_once  # type: ignore[method-assign]
        with pytest.raises(KafkaTimeoutError):
            await c.request(PARAMS, request_id="lost-1", timeout_s=60)
        response = await c.request(PARAMS, request_id="lost-1", timeout_s=60)  # the caller retries
        assert response["request_id"] == "lost-1"
        assert lost
    await _assert_copy_refused_before_the_answer(world, "lost-1")


async def test_the_blocking_api_from_threads(world: World, gateway: Gateway) -> None:
    prefix = f"{world.tag}."

    def run() -> dict[str, Any]:
        results: dict[str, Any] = {}
        with SyncPartnerClient(world.bootstrap, "acme", key_id="k1", secret=SECRET, topic_prefix=prefix) as c:
            with ThreadPoolExecutor(4) as pool:
                answers = pool.map(
                    lambda i: c.request(PARAMS, request_id=f"sync-{i}", timeout_s=60), range(4)
                )
                results["answers"] = [a["request_id"] for a in answers]
            try:
                c.request({**PARAMS, "model": "gpt-5"}, request_id="sync-bad", timeout_s=60)
            except DeadLettered as exc:
                results["bad"] = exc.reason
            with ThreadPoolExecutor(1) as pool:  # a copy sent while the first is answered
                first = pool.submit(c.request, PARAMS, "sync-dup", None, 60)
                time.sleep(0.3)
                c.send(PARAMS, request_id="sync-dup")
                results["dup"] = first.result()["request_id"]
            results["pending"] = c.pending()
        return results

    results = await asyncio.to_thread(run)
    assert results == {
        "answers": ["sync-0", "sync-1", "sync-2", "sync-3"],
        "bad": "unknown_model",
        "dup": "sync-dup",
        "pending": 0,
    }
    await _assert_copy_refused_before_the_answer(world, "sync-dup")


async def test_a_dead_letter_without_a_request_id_reaches_its_caller(world: World, gateway: Gateway) -> None:
    """An oversize record is refused before its request id is read: the dead letter has none,
    and the caller waited its whole timeout (600 s by default). It is matched by its record."""
    big = {**PARAMS, "messages": [{"role": "user", "content": "x" * 8000}]}
    async with _client(world) as c:
        with pytest.raises(DeadLettered) as raised:
            await c.request(big, request_id="big-1", timeout_s=30)
        assert raised.value.reason == "oversize"
        assert c.pending() == 0


async def test_a_reader_that_fails_fails_its_waiters_and_stop_closes_both_clients(
    world: World, gateway: Gateway
) -> None:
    """An ACL revoked on the response topic: waiters learned of it at their timeout, and
    `stop()` raised the reader's error with the producer and the consumer left open."""
    c = _client(world)
    await c.start()
    consumer, producer = c._consumer, c._producer
    assert consumer is not None
    assert producer is not None

    async def refused(*_: Any, **__: Any) -> Any:
        raise TopicAuthorizationFailedError("the response topic")

    consumer.getmany = refused  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="stopped reading outcomes"):
        await c.request(PARAMS, timeout_s=20)
    await c.stop()
    assert producer._closed
    assert consumer._closed


async def test_another_records_dead_letter_is_not_this_requests_outcome(
    world: World, gateway: Gateway
) -> None:
    """Another instance of the partner's app (or an earlier run) sent the same request id,
    badly signed: its `bad_signature` dead letter was taken for this client's outcome, and this
    client's own answered record was dropped."""
    other = PartnerClient(
        world.bootstrap, "acme", key_id="k1", secret="not-the-secret", topic_prefix=f"{world.tag}.",
        await_outcomes=False,
    )  # fmt: skip
    async with _client(world) as c:
        await other.start()
        try:
            await other.send(PARAMS, request_id="shared-1")
        finally:
            await other.stop()
        await c.send(PARAMS, request_id="shared-1")
        response = await c.outcome("shared-1", timeout_s=30)
    assert response["request_id"] == "shared-1"
