"""A partner's request record and Claude's answer to it, for the pipeline's unit tests (the
Claude HTTP layer faked with `httpx2.MockTransport`)."""

from __future__ import annotations

from typing import Any

import orjson

from service.admission.admit import Record

MODEL = "claude-haiku-4-5"


def params(max_tokens: int = 64) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}]}


def request_record(max_tokens: int = 64, request_id: str = "r1", offset: int = 7) -> Record:
    """acme's request `request_id` at `offset` of its topic's partition 0."""
    value = orjson.dumps({"request_id": request_id, "params": params(max_tokens)})
    return Record("claude.requests.acme", 0, offset, 1_700_000_000_000, request_id.encode(), value, ())


def answer(usage: Any, text: str = "ok") -> dict[str, Any]:
    """A Messages API body that ended its turn, with this `usage` (as given: it may be hostile)."""
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
