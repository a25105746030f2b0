"""The token approximation and the filler text."""

from __future__ import annotations

import math

import orjson
import pytest

from service.simulator.media import TOOL_PROMPT_TOKENS
from service.simulator.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    count_input_tokens,
    filler_text,
)

UNREADABLE_IMAGE_TOKENS = 1_600
"""An image whose size cannot be read costs the most an image can (ANTHROPIC: ~1,600 tokens)."""


def test_plain_text_is_about_four_characters_per_token() -> None:
    text = "x" * 400
    tokens = count_input_tokens({"messages": [{"role": "user", "content": text}]})
    assert tokens == 100 + MESSAGE_OVERHEAD_TOKENS


def test_counts_system_messages_blocks_and_tools() -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    doc = {
        "system": [{"type": "text", "text": "s" * 40}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "u" * 41}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A"}},
                ],
            },
        ],
        "tools": tools,
    }
    chars = 40 + 41 + len("get_weather") + len(orjson.dumps({"city": "Oslo"})) + len("sunny")
    chars += len(orjson.dumps(tools))
    expected = math.ceil(chars / 4) + UNREADABLE_IMAGE_TOKENS + 3 * MESSAGE_OVERHEAD_TOKENS
    expected += TOOL_PROMPT_TOKENS["auto"]
    assert count_input_tokens(doc) == expected


def test_is_deterministic_and_at_least_one() -> None:
    doc = {"messages": [{"role": "user", "content": "hello"}]}
    assert count_input_tokens(doc) == count_input_tokens(doc)
    assert count_input_tokens({}) == 1


@pytest.mark.parametrize("n", [0, 1, 2, 7, 100, 4096, 4097, 20_000])
def test_filler_counts_as_exactly_n_tokens(n: int) -> None:
    text = filler_text(n)
    assert math.ceil(len(text) / 4) == n
    if n:
        doc = {"messages": [{"role": "user", "content": text}]}
        assert count_input_tokens(doc) == n + MESSAGE_OVERHEAD_TOKENS
