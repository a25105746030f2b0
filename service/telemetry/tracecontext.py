"""W3C trace context from a request's Kafka headers, bounded: the partner controls those bytes.

A request's `traceparent`/`tracestate` are copied onto its outcome (tracing off) or extracted
as the parent of its spans and injected again (tracing on). Either way, what is used is only:

- a `traceparent` in its W3C form: 55 characters, `<2 hex>-<32 hex>-<16 hex>-<2 hex>`,
  lowercase, version not `ff`, ids not all zeros. Only the first `traceparent` header counts;
- a `tracestate` (only with a valid `traceparent`, as W3C requires): all `tracestate` headers
  as one list, cut to its valid members, each key once, at most 32 members and 512
  characters (W3C's truncation order). Only the first 32 KiB of it is read at all.

Anything else is dropped, never copied; no bytes, valid UTF-8 or not, make it raise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from service.contracts.shape import MAX_REQUEST_HEADERS

TRACE_HEADERS: Final = ("traceparent", "tracestate")
TRACESTATE_MAX_CHARS: Final = 512
TRACESTATE_MAX_MEMBERS: Final = 32
TRACESTATE_LONG_MEMBER: Final = 128
"""W3C: when a tracestate must be cut, members longer than this go first."""
OTHER_CONTEXT_MAX_BYTES: Final = 8192
"""Any other context header a propagator reads (baggage, b3, ...): longer values are ignored."""

Headers = Sequence[tuple[str | bytes, bytes | None]]
"""A record's headers; a name is bytes only when it was not valid UTF-8 (see service.ingest.fetch)."""


_TRACEPARENT: Final = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_TRACEPARENT_LEN: Final = 55
# W3C tracestate list member: key "=" value (the OpenTelemetry SDK's own pattern, as bytes)
_TRACESTATE_MEMBER: Final = re.compile(
    rb"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_TRACESTATE_SCAN_BYTES: Final = TRACESTATE_MAX_MEMBERS * 1024
"""Of all tracestate values together, only this much is read (32 members of the longest form fit)."""


def named_values(headers: Headers, name: str) -> Iterator[bytes]:
    """The non-null values of the headers called `name` (ASCII, case-insensitive), in order, among
    the first `MAX_REQUEST_HEADERS` (a record with more is refused at admission: contracts/shape.py)."""
    for k, v in headers[:MAX_REQUEST_HEADERS]:
        if v is not None and isinstance(k, str) and len(k) == len(name) and k.lower() == name:
            yield v


def valid_traceparent(value: bytes) -> bool:
    """A W3C `traceparent`: 55 characters, lowercase hex, version not ff, ids not all zeros."""
    return (
        len(value) == _TRACEPARENT_LEN
        and _TRACEPARENT.fullmatch(value) is not None
        and value[:2] != b"ff"
        and value[3:35] != b"0" * 32
        and value[36:52] != b"0" * 16
    )


def bounded_tracestate(values: Iterable[bytes]) -> bytes | None:
    """The `tracestate` headers joined as one W3C list, cut to what may be copied.

    Invalid members and repeated keys are dropped and at most 32 members are kept. While the
    list is longer than 512 characters, members over 128 characters go first, then the
    others, rightmost first (the W3C truncation order). None when nothing valid is left.
    """
    scanned: list[bytes] = []
    budget = _TRACESTATE_SCAN_BYTES
    partial = False
    for value in values:
        if len(value) > budget:
            scanned.append(value[:budget])
            partial = True
            break
        scanned.append(value)
        budget -= len(value) + 1
    pieces = b",".join(scanned).split(b",")
    if partial:
        pieces.pop()  # the member the scan cut in two
    members: list[bytes] = []
    keys: set[bytes] = set()
    for piece in pieces:
        member = piece.strip(b" \t")
        if not member or _TRACESTATE_MEMBER.fullmatch(member) is None:
            continue
        key = member.split(b"=", 1)[0]
        if key in keys:
            continue
        keys.add(key)
        members.append(member)
        if len(members) == TRACESTATE_MAX_MEMBERS:
            break

    def size(kept: list[bytes]) -> int:
        return sum(len(m) for m in kept) + max(0, len(kept) - 1)

    while size(members) > TRACESTATE_MAX_CHARS:
        longs = [i for i, m in enumerate(members) if len(m) > TRACESTATE_LONG_MEMBER]
        del members[longs[-1] if longs else -1]
    return b",".join(members) if members else None


def trace_context(headers: Headers) -> tuple[tuple[str, bytes], ...]:
    """The request's W3C trace context, bounded: `traceparent` if valid, then `tracestate`
    if anything of it is valid (only with a valid `traceparent`, as W3C requires). The first
    `traceparent` header counts; all `tracestate` headers form one list."""
    if not headers:
        return ()
    parent = next(named_values(headers, "traceparent"), None)
    if parent is None or not valid_traceparent(parent):
        return ()
    state = bounded_tracestate(named_values(headers, "tracestate"))
    if state is None:
        return (("traceparent", parent),)
    return (("traceparent", parent), ("tracestate", state))
