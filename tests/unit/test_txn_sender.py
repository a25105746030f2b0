"""The transactional producer's sender (service/config/txn_sender.py): the short retry of
CONCURRENT_TRANSACTIONS (only a new transaction's first AddOffsetsToTxn / AddPartitionsToTxn, a
bounded number of times), and transactions prepared ahead (`prepare`, `ready`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    ConcurrentTransactions,
    CoordinatorLoadInProgressError,
    GroupAuthorizationFailedError,
    NoError,
    ProducerFenced,
)
from aiokafka.producer import sender as aiokafka_sender

from service.config import txn_sender
from service.config.kafka import transactional_producer
from service.config.settings import KafkaSettings

TP = TopicPartition("claude.responses.p", 0)
DEFAULT_S = 0.1  # aiokafka's retry_backoff_ms, which the transactional producer keeps


@pytest.fixture
async def producer(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AIOKafkaProducer]:
    p = transactional_producer(KafkaSettings.model_validate({"bootstrap_servers": "b:9093"}), "g.t.0")
    sender: Any = p._sender
    sender._txn_manager.set_pid_and_epoch(7, 0)
    sender._txn_manager.begin_transaction()
    monkeypatch.setattr(sender, "_find_coordinator", _coordinator)
    yield p
    await p.stop()


async def _coordinator(*_: Any) -> int:
    return 1


def _answers(monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer, *codes: int) -> list[float]:
    """The broker answers `codes` in turn (as an AddOffsets and an AddPartitions response);
    returns the list the handlers' backoffs are recorded in."""
    replies = iter(codes)
    slept: list[float] = []

    async def send(*_: Any, **__: Any) -> Any:
        code = next(replies)
        return SimpleNamespace(error_code=code, errors=[(TP.topic, [(TP.partition, code)])])

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(producer._sender.client, "send", send)
    monkeypatch.setattr(aiokafka_sender.asyncio, "sleep", sleep)
    return slept


async def _add_offsets(producer: AIOKafkaProducer) -> bool:
    ok: bool = await producer._sender._do_add_offsets_to_txn("g")
    return ok


async def test_add_offsets_retries_concurrent_transactions_soon(
    monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer
) -> None:
    slept = _answers(monkeypatch, producer, ConcurrentTransactions.errno, NoError.errno)
    assert not await _add_offsets(producer)
    assert await _add_offsets(producer)
    assert slept == [txn_sender.FAST_BACKOFF_S]  # aiokafka alone: 0.1


async def test_add_partitions_retries_sooner_than_aiokafka(
    monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer
) -> None:
    slept = _answers(monkeypatch, producer, ConcurrentTransactions.errno)
    assert not await producer._sender._do_add_partitions_to_txn({TP})
    assert slept == [txn_sender.FAST_BACKOFF_S]  # aiokafka alone: its 0.02 override


async def test_the_fast_retries_are_bounded_then_start_again_after_a_success(
    monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer
) -> None:
    n = txn_sender.FAST_RETRIES
    codes = [ConcurrentTransactions.errno] * (n + 2) + [NoError.errno, ConcurrentTransactions.errno]
    slept = _answers(monkeypatch, producer, *codes)
    for _ in codes:
        await _add_offsets(producer)
        producer._sender._txn_manager._txn_consumer_group = None  # the next transaction's
    fast = txn_sender.FAST_BACKOFF_S
    assert slept == [fast] * n + [DEFAULT_S] * 2 + [fast]


async def test_other_errors_and_later_requests_keep_aiokafka_backoff(
    monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer
) -> None:
    slept = _answers(
        monkeypatch, producer, CoordinatorLoadInProgressError.errno, ConcurrentTransactions.errno
    )
    assert not await _add_offsets(producer)
    producer._sender._txn_manager._txn_partitions.add(TP)  # not the transaction's first request
    assert not await _add_offsets(producer)
    assert slept == [DEFAULT_S, DEFAULT_S]


async def test_only_these_methods_change(producer: AIOKafkaProducer) -> None:
    sender: Any = producer._sender
    assert isinstance(sender, aiokafka_sender.Sender)
    assert sender._retry_backoff == DEFAULT_S
    changed = {
        name for name, attr in vars(type(sender)).items() if callable(attr) and not name.startswith("__")
    }
    assert changed == {
        "_coordinator",
        "_do_add_partitions_to_txn",
        "_do_add_offsets_to_txn",
        "_maybe_do_transactional_request",
        "_signal",
        "_waiter",
    }
    # what the subclass relies on in aiokafka (a newer aiokafka must be checked again)
    assert aiokafka_sender.Sender._maybe_do_transactional_request
    txn = sender._txn_manager
    for name in ("_txn_consumer_group", "txn_partitions", "maybe_add_partition_to_txn", "notify_task_waiter"):
        assert hasattr(txn, name), name
    assert producer._partition
    assert aiokafka_sender.AddOffsetsToTxnHandler.handle_response


OUT = TopicPartition("claude.usage", 1)


def _requests(monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer) -> list[str]:
    """Every request the sender sends, by name; each answered without error."""
    sent: list[str] = []

    async def send(_node: int, req: Any, **__: Any) -> Any:
        sent.append(type(req).__name__.removesuffix("Request").split("_")[0])
        if hasattr(req, "_topics"):  # AddPartitionsToTxn: every partition added
            errors = [(t, [(p, NoError.errno) for p in ps]) for t, ps in req._topics]
        else:
            errors = [(TP.topic, [(TP.partition, NoError.errno)])]
        return SimpleNamespace(error_code=NoError.errno, errors=errors)

    monkeypatch.setattr(producer._sender.client, "send", send)
    return sent


async def _pump(producer: AIOKafkaProducer) -> None:
    """What the sender's routine does with transactional requests, one at a time."""
    while (task := producer._sender._maybe_do_transactional_request()) is not None:
        await task
        await asyncio.sleep(0)


async def test_prepare_adds_the_partitions_then_the_group_and_sends_nothing_else(
    monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer
) -> None:
    sent = _requests(monkeypatch, producer)
    txn_sender.prepare(producer, [TP, OUT], "g")
    await _pump(producer)
    assert sent == ["AddPartitionsToTxn", "AddOffsetsToTxn"]
    txn = producer._txn_manager
    assert txn.txn_partitions == {TP, OUT}
    assert txn._txn_consumer_group == "g"
    assert not txn._pending_txn_offsets  # no offsets were committed


async def test_ready_returns_once_everything_is_added(
    monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer
) -> None:
    sent = _requests(monkeypatch, producer)
    waiting = asyncio.ensure_future(txn_sender.ready(producer, [TP], "g"))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # nothing added yet
    await _pump(producer)
    await asyncio.wait_for(waiting, 1)
    assert sent == ["AddPartitionsToTxn", "AddOffsetsToTxn"]
    sent.clear()
    await asyncio.wait_for(txn_sender.ready(producer, [TP], "g"), 1)  # all there: at once
    assert sent == []


async def test_ready_raises_when_the_transaction_fails(producer: AIOKafkaProducer) -> None:
    waiting = asyncio.ensure_future(txn_sender.ready(producer, [TP], "g"))
    await asyncio.sleep(0)
    producer._txn_manager.fatal_error(ProducerFenced())
    with pytest.raises(ProducerFenced):
        await asyncio.wait_for(waiting, 1)


async def test_the_group_added_ahead_is_forgotten_when_the_transaction_ends(
    monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer
) -> None:
    sent = _requests(monkeypatch, producer)
    txn_sender.prepare(producer, [], "g")
    producer._txn_manager.aborting_transaction()
    await _pump(producer)
    assert sent == []  # an empty transaction ends without a request
    assert producer._sender._group_to_add is None


async def test_ready_raises_the_error_of_a_transaction_that_failed_in_the_background(
    producer: AIOKafkaProducer,
) -> None:
    """Say the group was refused while it was added ahead: the next tick gets that error (the
    writer then starts afresh), not an assertion from aiokafka."""
    producer._txn_manager.error_transaction(GroupAuthorizationFailedError("g"))
    with pytest.raises(GroupAuthorizationFailedError):
        await asyncio.wait_for(txn_sender.ready(producer, [TP], "g"), 1)
