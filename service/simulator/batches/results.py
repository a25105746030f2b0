"""The results file of an ended batch: JSONL, one line per entry, in the batch's fixed order.

    {"custom_id": "a", "result": {"type": "succeeded", "message": {...}}}
    {"custom_id": "b", "result": {"type": "errored", "error": {"type": "error", "error": {...}}}}
    {"custom_id": "c", "result": {"type": "canceled"}}
    {"custom_id": "d", "result": {"type": "expired"}}

A succeeded entry is stored as its Message without `content` plus its output token count;
the filler text (service/simulator/tokens.py) is added as the line is written, so a batch's
memory does not grow with the length of its answers. Lines are written in chunks, never the
whole file at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from service.simulator.batches.model import CANCELED, ERRORED, EXPIRED, SUCCEEDED, Batch
from service.simulator.tokens import filler_text

CHUNK_BYTES = 64 * 1024
_FIXED = {CANCELED: b'{"type":"canceled"}', EXPIRED: b'{"type":"expired"}'}


def result_line(batch: Batch, position: int) -> bytes:
    """The JSONL line (with its newline) of the entry at `position` of an ended batch."""
    kind = batch.kinds[position]
    payload = batch.payloads[position]
    if kind == SUCCEEDED:
        assert payload is not None
        tokens = batch.output_tokens[position]
        content = orjson.dumps([{"type": "text", "text": filler_text(tokens)}] if tokens else [])
        # The stored Message is a JSON object without `content`: add it before its closing brace.
        message = payload[:-1] + b',"content":' + content + b"}"
        result = b'{"type":"succeeded","message":' + message + b"}"
    elif kind == ERRORED:
        assert payload is not None
        result = b'{"type":"errored","error":' + payload + b"}"
    else:
        result = _FIXED[kind]
    return b'{"custom_id":' + orjson.dumps(batch.custom_id_at(position)) + b',"result":' + result + b"}\n"


def result_chunks(batch: Batch, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The results file in pieces of about `chunk_bytes`."""
    parts: list[bytes] = []
    size = 0
    for position in range(batch.size):
        line = result_line(batch, position)
        parts.append(line)
        size += len(line)
        if size >= chunk_bytes:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)
