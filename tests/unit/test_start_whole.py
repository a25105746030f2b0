"""`start_whole`: producers' starts end before a cancel goes on, and their first error is raised
once every start ended (tests/integration/test_producer_start_cancel.py: the leak it prevents)."""

from __future__ import annotations

import asyncio

import pytest

from service.config import kafka
from service.config.kafka import start_whole


class _Producer:
    def __init__(self, gate: asyncio.Event, error: Exception | None = None) -> None:
        self.gate, self.error = gate, error
        self.started = self.cancelled = False

    async def start(self) -> None:
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        self.started = True


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_cancel_lets_the_starts_end_then_goes_on(cancels: int) -> None:
    """Two cancels: `Turns.stop` cancels an open that a rebalance cancelled already; the
    second does not cut the wait short, the starts still end before the producers stop."""
    gate = asyncio.Event()
    producers = [_Producer(gate), _Producer(gate)]
    starting = asyncio.create_task(start_whole(producers))
    for _ in range(cancels):
        await asyncio.sleep(0.01)
        starting.cancel()
    await asyncio.sleep(0.05)
    assert not starting.done(), "every cancel waits for the starts under way"
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(starting, 2)
    assert [(p.started, p.cancelled) for p in producers] == [(True, False), (True, False)]


async def test_a_start_that_outlasts_the_grace_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka, "START_GRACE_S", 0.05)
    producer = _Producer(asyncio.Event())  # never let go
    starting = asyncio.create_task(start_whole([producer]))
    await asyncio.sleep(0.01)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(starting, 2)
    await asyncio.sleep(0)
    assert producer.cancelled


async def test_the_first_error_is_raised_once_every_start_ended() -> None:
    gate, slow = asyncio.Event(), asyncio.Event()
    failing, late = _Producer(gate, RuntimeError("refused")), _Producer(slow)
    gate.set()
    starting = asyncio.create_task(start_whole([failing, late]))
    await asyncio.sleep(0.05)
    assert not starting.done(), "the other start is still under way"
    slow.set()
    with pytest.raises(RuntimeError, match="refused"):
        await asyncio.wait_for(starting, 2)
    assert late.started


async def test_nothing_to_start() -> None:
    await start_whole([])
