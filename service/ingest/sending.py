"""Sending a tick's outcomes: which refusals are final, and which batches to split.

The broker applies `max.message.bytes` to a whole record batch, and aiokafka
does not split a refused batch (the Java producer does): every message in it
fails with `MessageSizeTooLargeError`. An item refused among others is
therefore sent again in batches of its own (`Item.alone`); only the refusal of
an item sent alone is final, and the caller then makes a smaller outcome. An
item's messages (an outcome and its metering record) belong together: once one
is refused, the item's later messages are not sent (and with exactly-once the
tick's transaction, which holds the earlier ones, is aborted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from service.config.txn_sender import partition_of
from service.ingest.ledger import Claim

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class OutMessage:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = ()


@dataclass(slots=True)
class Item:
    offset: int
    messages: Sequence[OutMessage] = ()
    claim: Claim | None = None
    finish: bool = False
    release: bool = False
    """Drop the offset's claim without finishing it: its last call was answered, unbilled,
    and the request is left to the partition's next owner, which calls it afresh."""
    alone: bool = False
    """Refused in a batch with others: sent again in a batch of its own."""
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


Routes = Mapping[int, TopicPartition]
"""Where each message goes, by `id` of the message (`route`)."""


async def route(producer: AIOKafkaProducer, items: Sequence[Item]) -> dict[int, TopicPartition]:
    """The partition of every message of `items`, as the producer would choose it. A message
    whose topic the producer cannot know (unauthorized, invalid) is left out: `send_all` meets
    the same error from `send` and refuses its item."""
    routes: dict[int, TopicPartition] = {}
    for item in items:
        for m in item.messages:
            try:
                routes[id(m)] = TopicPartition(m.topic, await partition_of(producer, m.topic, m.key))
            except KafkaError as exc:
                if not _refusal(exc):
                    raise
    return routes


async def send_all(
    producer: AIOKafkaProducer, items: list[Item], routes: Routes | None = None
) -> tuple[list[Item], list[Item]]:
    """Send every message (to its partition in `routes`, if given): (the items refused for
    good, those to send again alone). Any other error fails the whole tick.

    The broker applies `max.message.bytes` to a whole batch and aiokafka does not split a
    refused batch, so a message refused among other items' messages is marked `alone` and
    sent again in a batch of its own; only the refusal of an item sent alone (or the only
    item of its tick: an outcome with its metering record) is final."""
    refused: dict[int, Item] = {}
    for item in items:
        if item.alone:
            for m in item.messages:
                try:
                    await (await _send(producer, m, routes))
                except KafkaError as exc:
                    if not _refusal(exc):
                        raise
                    _set_error(item, exc)
                    refused[id(item)] = item
                    break
    futures: list[tuple[Item, asyncio.Future[object]]] = []
    for item in items:
        if item.alone:
            continue
        for m in item.messages:
            try:
                fut = await _send(producer, m, routes)
            except KafkaError as exc:  # refused before sending: this message alone is too big
                if not _refusal(exc):
                    raise
                _set_error(item, exc)
                refused[id(item)] = item
                break  # nor the item's next ones: an outcome's metering record never goes without it
            futures.append((item, fut))
    resend: list[Item] = []
    if futures:
        results = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
        failure: BaseException | None = None
        one_item = len({id(item) for item, _ in futures}) == 1  # its batches had nothing else
        for (item, _), res in zip(futures, results, strict=True):
            if not isinstance(res, BaseException):
                continue
            if _refusal(res) and one_item:
                _set_error(item, res)
                refused[id(item)] = item
            elif _refusal(res):
                if not item.alone and id(item) not in refused:
                    item.alone = True
                    resend.append(item)
            elif failure is None or isinstance(res, ProducerFenced):
                failure = res
        if failure is not None:
            raise failure
    return list(refused.values()), resend


async def _send(producer: AIOKafkaProducer, m: OutMessage, routes: Routes | None) -> asyncio.Future[object]:
    tp = None if routes is None else routes.get(id(m))
    partition = None if tp is None else tp.partition
    fut: asyncio.Future[object] = await producer.send(
        m.topic, m.value, key=m.key, partition=partition, headers=list(m.headers)
    )
    return fut


_REFUSALS = frozenset(
    {
        "MessageSizeTooLargeError",
        "RecordTooLargeError",
        "RecordBatchTooLargeError",
        "InvalidTopicError",
        "TopicAuthorizationFailedError",
        "PolicyViolationError",
        "InvalidRecordError",
        "CorruptRecordException",
    }
)


def _refusal(exc: BaseException) -> bool:
    """The broker will never take this message: the caller must make another outcome."""
    return type(exc).__name__ in _REFUSALS


def fail(items: Iterable[Item], exc: BaseException) -> None:
    """Every item not yet done fails with `exc`, retrieved at once: a waiter cancelled
    meanwhile must not warn that it was never retrieved."""
    for item in items:
        if not item.done.done():
            item.done.set_exception(exc)
            item.done.exception()


def _set_error(item: Item, exc: BaseException) -> None:
    log.warning("the broker refused an outcome: %s", type(exc).__name__, extra={"offset": item.offset})
    if not item.done.done():
        item.done.set_exception(exc)
