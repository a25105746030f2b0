"""How large a request's structure may be: `MAX_DEPTH` levels of objects and arrays, and
`MAX_REQUEST_HEADERS` Kafka headers.

**Nesting.** orjson reads documents nested up to 1,024 levels, but writes at most about 254, and
the gateway writes parts of every request again (the input estimate dumps each tool and unknown
block, the response cache digests the params, the batch path wraps them in a batch). A request
nested between the two limits was read, then raised while being written: no outcome, and the
partition stopped at that record on every start. So admission refuses, as a `schema_violation`
naming the place, any document nested deeper than `MAX_DEPTH`: far more than any real tool schema
or tool input uses, and far below what every later step can write (they add a few levels at most).

**Headers.** Each step that looks for a header by name (trace context, signature, operator replay)
reads the list through: 320,000 empty headers (a 0.9 MB record the broker takes) held the event
loop about 350 ms. Admission refuses more than `MAX_REQUEST_HEADERS` as `oversize`, and the trace context is
looked for among the first `MAX_REQUEST_HEADERS` only (`telemetry/tracecontext.py`), as it is read before.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 128
"""Levels of objects and arrays in a request, the document itself being the first."""
MAX_REQUEST_HEADERS = 1_000
"""Kafka headers on a request record (real clients send a handful: trace context, signature)."""
_SHOWN = 6
"""Leading steps of the path named in the refusal (the rest is elided)."""


def too_deep(doc: Any, raw: bytes, limit: int = MAX_DEPTH) -> str | None:
    """Why `doc` (read from `raw`) nests too deeply, or None. Cheap for the usual request: a
    document with fewer than `limit` brackets in all cannot nest that deep, and is not walked."""
    if raw.count(b"[") + raw.count(b"{") < limit:
        return None
    path = _deeper(doc, 1, limit)
    if path is None:
        return None
    shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p[:64]}" for p in path[:_SHOWN])
    more = "..." if len(path) > _SHOWN else ""
    return f"nested more than {limit} levels deep at {shown.lstrip('.')}{more}; at most {limit}"


def _deeper(node: Any, depth: int, limit: int) -> list[str | int] | None:
    """The path to the first container deeper than `limit` under `node` (at `depth`), or None.
    Recurses at most `limit` levels."""
    if depth > limit:
        return []
    items: Any
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return None
    for key, value in items:
        if isinstance(value, dict | list):
            path = _deeper(value, depth + 1, limit)
            if path is not None:
                return [key, *path]
    return None
