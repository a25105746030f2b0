"""A writer's producers cancelled while they start leave no connection open, on the real broker.

CI failed once on two `Unclosed AIOKafkaConnection` warnings: a stopping replica cancelled a
takeover while its producers were starting, and aiokafka's `bootstrap` closes its connection
only on errors, so the cancel left the socket and its read task where no `stop` reaches them.
`service.config.kafka.start_whole` lets the starts end first.

CI failed again the same way when the stop did not wait for that: a rebalance or a drain
cancels a takeover and closes its writer at once (`Ownership.retire`), so `Turns.stop` ran while
the cancelled starts were still ending; a start that ended after its producer's `stop` opened
its coordinator connection on a closed client. `Turns.stop` now waits for an open under way.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka.conn import AIOKafkaConnection

from service.config.kafka import transactional_producer
from service.config.settings import KafkaSettings
from service.ingest.turns import Turns

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stop_at_once", [False, True], ids=["stop-after", "stop-during"])
async def test_producers_cancelled_in_their_bootstrap_leave_no_connection_open(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, stop_at_once: bool
) -> None:
    made: list[AIOKafkaConnection] = []
    in_bootstrap, release = asyncio.Event(), asyncio.Event()
    init, send = AIOKafkaConnection.__init__, AIOKafkaConnection.send

    def tracked(self: AIOKafkaConnection, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    async def held(self: AIOKafkaConnection, request: Any, expect_response: bool) -> Any:
        in_bootstrap.set()
        await release.wait()  # the cancel comes here, inside `bootstrap`'s metadata request
        return await send(self, request, expect_response)

    def sending(self: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        if type(request).__name__.startswith("MetadataRequest") and not release.is_set():
            return held(self, request, expect_response)
        return send(self, request, expect_response)

    monkeypatch.setattr(AIOKafkaConnection, "__init__", tracked)
    monkeypatch.setattr(AIOKafkaConnection, "send", sending)
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, group_id=f"g-{uuid.uuid4().hex[:8]}")
    turns = Turns(
        settings.group_id, f"{settings.group_id}.t.0", 2, 1.0, lambda i: transactional_producer(settings, i)
    )
    try:
        opening = asyncio.create_task(turns.open())
        await asyncio.wait_for(in_bootstrap.wait(), 10)
        opening.cancel()  # as `Ownership.close` cancels a takeover under way
        stopping = None
        if stop_at_once:  # and as `Ownership.retire` closes the writer of a cancelled takeover
            stopping = asyncio.create_task(turns.stop())
        await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(opening, 30)
        await (stopping if stopping is not None else turns.stop())
        await asyncio.sleep(0.5)  # a start that outlived its stop connects to the coordinator here
        assert made, "the producers connected"
        assert [c for c in made if c.connected()] == [], "a connection no stop reaches"
    finally:
        release.set()
        for conn in made:
            conn.close()  # what a failing run left: not a second failure at garbage collection
