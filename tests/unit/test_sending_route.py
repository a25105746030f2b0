"""Where a tick's messages go (service/ingest/sending.py `route`): the producer's own choice,
and a topic it may not know is left to `send`, which refuses its item as before."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from service.ingest.sending import Item, OutMessage, route


class _Producer:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def partitions_for(self, topic: str) -> set[int]:
        if topic == "denied":
            raise self.error
        return {0, 1, 2}

    def _partition(self, topic: str, partition: Any, key: bytes | None, *_: Any) -> int:
        return len(key or b"") % 3


async def test_messages_go_where_the_producer_would_send_them_and_unknown_topics_are_left_out() -> None:
    ok, denied = OutMessage("responses", b"ab", b"v"), OutMessage("denied", b"k", b"v")
    item = Item(0, messages=[ok, denied])
    routes = await route(_Producer(TopicAuthorizationFailedError("denied")), [item])
    assert routes == {id(ok): TopicPartition("responses", 2)}


async def test_an_error_that_is_no_refusal_fails_the_tick() -> None:
    item = Item(0, messages=[OutMessage("denied", b"k", b"v")])
    with pytest.raises(KafkaTimeoutError):
        await route(_Producer(KafkaTimeoutError()), [item])
