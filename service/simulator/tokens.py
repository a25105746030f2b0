"""Deterministic token arithmetic: input token counts and filler output text.

The simulator has no tokenizer. For text it uses the common rule of thumb of about four
characters per token, which is cheap and deterministic:

    input_tokens = ceil(chars / 4) + 3 * len(messages) + media + tools, at least 1

where `chars` counts the text of `system`, of every message (string content,
`text`/`thinking` blocks, tool names and JSON-encoded tool inputs, tool result
content, documents given as text) and the JSON encoding of `tools`. Images, PDFs,
the tool-use system prompt and server tool results are billed as Anthropic documents
them (`media.py`: an image by its size, a PDF by its pages and text). Unknown block
types count their JSON encoding. `count_tokens` and `/v1/messages` use the same
function, so the estimate a client gets from `count_tokens` is exactly what `usage`
reports.

Output text is filler of four characters per token (`filler_text(n)` has
exactly the length that counts as `n` tokens by the rule above).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from service.contracts.media import InflateBudget
from service.simulator.media import image_source_tokens, pdf_tokens, tool_tokens

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 3


def block_chars(block: Any, model: str, budget: InflateBudget | None = None) -> tuple[int, int]:
    """(characters, flat tokens) of one content block. `budget`: what the request's PDFs may
    still inflate together (one per request, as admission has: a PDF apiece let a 400 KB
    request of 50 small PDFs inflate and scan 200 MB, 10 s on the simulator's event loop)."""
    if budget is None:
        budget = InflateBudget()
    if not isinstance(block, Mapping):
        return len(orjson.dumps(block)), 0
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return (len(text) if isinstance(text, str) else 0), 0
    if kind == "thinking":
        text = block.get("thinking")
        return (len(text) if isinstance(text, str) else 0), 0
    if kind == "image":
        return 0, image_source_tokens(block.get("source"), model)
    if kind == "document":
        source = block.get("source")
        if isinstance(source, Mapping):
            if source.get("type") == "text":
                data = source.get("data")
                return (len(data) if isinstance(data, str) else 0), 0
            if source.get("type") == "content":
                return _content_chars(source.get("content"), model, budget)
            pdf = pdf_tokens(source, model, budget)
            if pdf is not None:
                return 0, pdf
        return len(orjson.dumps(block)), 0
    if kind == "tool_use":
        name = block.get("name")
        return (len(name) if isinstance(name, str) else 0) + len(orjson.dumps(block.get("input"))), 0
    if kind == "tool_result":
        return _content_chars(block.get("content"), model, budget)
    return len(orjson.dumps(block)), 0


def _content_chars(content: Any, model: str, budget: InflateBudget) -> tuple[int, int]:
    """(characters, flat tokens) of a string or a list of blocks."""
    if content is None:
        return 0, 0
    if isinstance(content, str):
        return len(content), 0
    if isinstance(content, Sequence):
        chars = flat = 0
        for block in content:
            c, f = block_chars(block, model, budget)
            chars += c
            flat += f
        return chars, flat
    return len(orjson.dumps(content)), 0


def count_input_tokens(body: Mapping[str, Any]) -> int:
    """Input tokens of a (validated) Messages request body, by the rule in the module docstring."""
    model = str(body.get("model") or "")
    budget = InflateBudget()  # the request's PDFs inflate this much together
    chars, flat = _content_chars(body.get("system"), model, budget)
    messages = body.get("messages") or ()
    for message in messages:
        if isinstance(message, Mapping):
            c, f = _content_chars(message.get("content"), model, budget)
            chars += c
            flat += f
    tools = body.get("tools")
    if tools:
        chars += len(orjson.dumps(tools))
        flat += tool_tokens(body, _seed(body))
    tokens = -(-chars // CHARS_PER_TOKEN) + flat + MESSAGE_OVERHEAD_TOKENS * len(messages)
    return max(1, tokens)


def _seed(body: Mapping[str, Any]) -> str:
    """What server tool results are drawn from: the request's last message."""
    messages = body.get("messages") or ()
    last = messages[-1] if messages else None
    return orjson.dumps(last).decode() if last is not None else ""


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
