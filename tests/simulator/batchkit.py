"""Helpers for the Message Batches tests: entries, and polling a batch through the SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anthropic
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-6"
OPUS = "claude-opus-4-7"


def params(
    model: str = HAIKU, max_tokens: int = 100, text: str = "Hello, batch", **extra: Any
) -> dict[str, Any]:
    """Messages params for a batch entry (or for `/v1/messages`)."""
    return {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def entry(custom_id: str, **kwargs: Any) -> Any:
    """A batch request `{"custom_id", "params"}`; kwargs go to `params()`."""
    return {"custom_id": custom_id, "params": params(**kwargs)}


async def wait_until(
    client: anthropic.AsyncAnthropic,
    batch_id: str,
    condition: Callable[[MessageBatch], bool],
    timeout_s: float = 15.0,
) -> MessageBatch:
    """Poll `retrieve` until `condition` holds; fail with the last state after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await client.messages.batches.retrieve(batch_id)
        if condition(batch):
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} never reached the condition: {batch}")
        await asyncio.sleep(0.02)


async def ended(client: anthropic.AsyncAnthropic, batch_id: str) -> MessageBatch:
    """The batch once `processing_status` is `ended`."""
    return await wait_until(client, batch_id, lambda b: b.processing_status == "ended")


async def results(client: anthropic.AsyncAnthropic, batch_id: str) -> list[MessageBatchIndividualResponse]:
    """Every line of the batch's results file, in file order."""
    return [line async for line in await client.messages.batches.results(batch_id)]
