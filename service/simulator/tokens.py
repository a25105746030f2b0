"""Deterministic token arithmetic: input token counts and filler output text.

The simulator has no tokenizer. It uses the common rule of thumb of about four
characters per token, which is cheap and deterministic:

    input_tokens = ceil(chars / 4) + 3 * len(messages), at least 1

where `chars` counts the text of `system`, of every message (string content,
`text`/`thinking` blocks, tool names and JSON-encoded tool inputs, tool result
content) and the JSON encoding of `tools`. Images and documents with a binary
source count a flat `MEDIA_BLOCK_TOKENS` each. Unknown block types count their
JSON encoding. `count_tokens` and `/v1/messages` use the same function, so the
estimate a client gets from `count_tokens` is exactly what `usage` reports.

Output text is filler of four characters per token (`filler_text(n)` has
exactly the length that counts as `n` tokens by the rule above).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 3
MEDIA_BLOCK_TOKENS = 1_000

_MEDIA_TYPES = frozenset({"image", "document"})


def _block_chars(block: Any) -> tuple[int, int]:
    """(characters, flat tokens) of one content block."""
    if not isinstance(block, Mapping):
        return len(orjson.dumps(block)), 0
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return (len(text) if isinstance(text, str) else 0), 0
    if kind == "thinking":
        text = block.get("thinking")
        return (len(text) if isinstance(text, str) else 0), 0
    if kind in _MEDIA_TYPES:
        source = block.get("source")
        if isinstance(source, Mapping) and source.get("type") == "text":
            data = source.get("data")
            return (len(data) if isinstance(data, str) else 0), 0
        return 0, MEDIA_BLOCK_TOKENS
    if kind == "tool_use":
        name = block.get("name")
        return (len(name) if isinstance(name, str) else 0) + len(orjson.dumps(block.get("input"))), 0
    if kind == "tool_result":
        return _content_chars(block.get("content"))
    return len(orjson.dumps(block)), 0


def _content_chars(content: Any) -> tuple[int, int]:
    """(characters, flat tokens) of a string or a list of blocks."""
    if content is None:
        return 0, 0
    if isinstance(content, str):
        return len(content), 0
    if isinstance(content, Sequence):
        chars = flat = 0
        for block in content:
            c, f = _block_chars(block)
            chars += c
            flat += f
        return chars, flat
    return len(orjson.dumps(content)), 0


def count_input_tokens(body: Mapping[str, Any]) -> int:
    """Input tokens of a (validated) Messages request body, by the rule in the module docstring."""
    chars, flat = _content_chars(body.get("system"))
    messages = body.get("messages") or ()
    for message in messages:
        if isinstance(message, Mapping):
            c, f = _content_chars(message.get("content"))
            chars += c
            flat += f
    tools = body.get("tools")
    if tools:
        chars += len(orjson.dumps(tools))
    tokens = -(-chars // CHARS_PER_TOKEN) + flat + MESSAGE_OVERHEAD_TOKENS * len(messages)
    return max(1, tokens)


_WORDS = (
    "the", "sim", "api", "cat", "sat", "log", "day", "red", "sky", "run",
    "map", "key", "big", "new", "old", "one", "two", "fix", "net", "box",
)  # fmt: skip
_BASE_TOKENS = 4096
_BASE = " ".join(_WORDS[(i * 7 + i // len(_WORDS)) % len(_WORDS)] for i in range(_BASE_TOKENS)) + " "


def filler_text(tokens: int) -> str:
    """Cheap filler text that counts as exactly `tokens` tokens (4 characters each)."""
    if tokens <= 0:
        return ""
    length = tokens * CHARS_PER_TOKEN - 1
    if tokens <= _BASE_TOKENS:
        return _BASE[:length]
    return (_BASE * (tokens // _BASE_TOKENS + 1))[:length]
