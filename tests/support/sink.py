"""An in-memory `service.egress.emit.Sink` for the pipeline's unit tests: claims, releases and
backoffs as a partition writer would (never handed off), and every publish kept."""

from __future__ import annotations

import asyncio

from service.ingest.ledger import Claim
from service.ingest.sending import OutMessage


class MemorySink:
    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.inherited: Claim | None = None
        self.claimed = False
        self.attempts = 0
        self.owner = "test"
        self.handed_off = False
        self.published: list[OutMessage] = []
        self.left = False

    async def claim(self, attempts: int) -> None:
        self.claimed, self.attempts = True, attempts

    async def release(self) -> None:
        self.claimed = False

    def leave(self) -> None:
        self.left = True

    async def backoff(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)

    async def publish(self, messages: list[OutMessage], *, linger: bool = False) -> None:
        self.published.extend(messages)
