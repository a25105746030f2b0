"""What a simulated model writes for a valid request, shared by `/v1/messages` and batches.

`draw_completion` makes the output draws (length, then whether a stop sequence ends it) from
the generator it is given, in the order `/v1/messages` always made them, and `message_of`
builds the Message object, so a batch entry's message is exactly what `/v1/messages` would
answer for the same params, only with `usage.service_tier` "batch".
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.simulator.caching import NO_CACHE, CacheUse
from service.simulator.config import OutputSettings
from service.simulator.sampling import draw_output_tokens
from service.simulator.tokens import filler_text
from service.simulator.usage import usage_of


@dataclass(frozen=True, slots=True)
class Completion:
    """The drawn end of a call: tokens written, and why it stopped."""

    output_tokens: int
    stop_reason: str
    stop_sequence: str | None = None


def draw_completion(rng: random.Random, output: OutputSettings, body: Mapping[str, Any]) -> Completion:
    """Output tokens (capped by `max_tokens`) and the stop reason for a validated body."""
    max_tokens: int = body["max_tokens"]
    wanted = draw_output_tokens(rng, output)
    if wanted >= max_tokens:
        return Completion(max_tokens, "max_tokens")
    stops = body.get("stop_sequences")
    rate = output.stop_sequence_rate
    if stops and rate > 0 and rng.random() < rate:
        return Completion(wanted, "stop_sequence", stops[0])
    return Completion(wanted, "end_turn")


def message_of(
    message_id: str,
    body: Mapping[str, Any],
    input_tokens: int,
    completion: Completion,
    *,
    priority_tier: bool = False,
    batch: bool = False,
    with_content: bool = True,
    cache: CacheUse = NO_CACHE,
) -> dict[str, Any]:
    """The Message answered for `body`. `with_content=False` leaves `content` out (a batch
    stores its results without the text and adds it when they are read: see batches/results.py)."""
    message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": body["model"],
    }
    if with_content:
        tokens = completion.output_tokens
        message["content"] = [{"type": "text", "text": filler_text(tokens)}] if tokens else []
    message["stop_reason"] = completion.stop_reason
    message["stop_sequence"] = completion.stop_sequence
    message["usage"] = usage_of(
        body, input_tokens, completion.output_tokens, priority_tier=priority_tier, batch=batch, cache=cache
    )
    return message
