"""The transactional producer's short retry of CONCURRENT_TRANSACTIONS (service/config/txn_backoff.py):
only a new transaction's first AddOffsetsToTxn / AddPartitionsToTxn, a bounded number of times."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import ConcurrentTransactions, CoordinatorLoadInProgressError, NoError
from aiokafka.producer import sender as aiokafka_sender

from service.config import txn_backoff
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
    assert slept == [txn_backoff.FAST_BACKOFF_S]  # aiokafka alone: 0.1


async def test_add_partitions_retries_sooner_than_aiokafka(
    monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer
) -> None:
    slept = _answers(monkeypatch, producer, ConcurrentTransactions.errno)
    assert not await producer._sender._do_add_partitions_to_txn({TP})
    assert slept == [txn_backoff.FAST_BACKOFF_S]  # aiokafka alone: its 0.02 override


async def test_the_fast_retries_are_bounded_then_start_again_after_a_success(
    monkeypatch: pytest.MonkeyPatch, producer: AIOKafkaProducer
) -> None:
    n = txn_backoff.FAST_RETRIES
    codes = [ConcurrentTransactions.errno] * (n + 2) + [NoError.errno, ConcurrentTransactions.errno]
    slept = _answers(monkeypatch, producer, *codes)
    for _ in codes:
        await _add_offsets(producer)
        producer._sender._txn_manager._txn_consumer_group = None  # the next transaction's
    fast = txn_backoff.FAST_BACKOFF_S
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


async def test_only_the_two_handlers_change(producer: AIOKafkaProducer) -> None:
    sender: Any = producer._sender
    assert isinstance(sender, aiokafka_sender.Sender)
    assert sender._retry_backoff == DEFAULT_S
    changed = {
        name for name, attr in vars(type(sender)).items() if callable(attr) and not name.startswith("__")
    }
    assert changed == {"_coordinator", "_do_add_partitions_to_txn", "_do_add_offsets_to_txn"}
    # what the subclass relies on in aiokafka (a newer aiokafka must be checked again)
    assert aiokafka_sender.Sender._maybe_do_transactional_request
    assert aiokafka_sender.AddOffsetsToTxnHandler.handle_response
