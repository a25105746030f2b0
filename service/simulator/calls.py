"""Calls per request, so that double billing is measurable from outside (`GET /_sim/calls`).

The request a Messages call belongs to is named by the `x-gateway-request-id` header, which
the gateway sets to `<partner_id>:<request_id>`; without that header, by the body's
`metadata.user_id` (a partner may put its own key there). A call with neither is counted in
`unkeyed_calls` only.

Three counts per key:

- `ok`: answered 2xx. The work was done and billed; the simulator counts it even when the
  client was gone by then (a gateway killed mid-call still pays for the call).
- `billed`: did the work: `ok` plus connections dropped after the work (fault `drop_rate`).
- `all`: every call, including 4xx/5xx answers that bill nothing.

Memory bound: at most `max_tracked_requests` keys (SimulatorConfig, default 1,000,000).
The counts of a key are packed in one Python int, so an entry costs its key string plus its
dict slot and int: 177 MB measured for 1,000,000 keys of 57 characters (tracemalloc).
Once the cap is reached, calls for keys not yet tracked are counted in `untracked_calls`
and nothing else grows; keys already tracked keep counting. A key longer than
`MAX_KEY_CHARS` is stored as `sha256:<hex>` so one hostile header cannot use the budget.
`POST /_sim/reset` clears everything.

Message Batch entries are counted apart, by their `custom_id` (`batch_calls_by_custom_id` in
`GET /_sim/calls`, totals in `batch_calls`; service/simulator/batches/stats.py), with the same
three counts and the same filters: a succeeded entry is one `ok` and `billed` call of its
custom_id, any other outcome counts in `all` only. A batch entry has no header of its own,
and a custom_id cannot carry `<partner_id>:<request_id>` (`:` and `.` are not allowed, 64
characters at most), so the simulator takes the custom_id as it is and never maps it back.
`batch_custom_id(request_key)` is the mapping the gateway is expected to use (the SHA-256 of
the request key, 64 hex characters): a request's billed calls are then
`calls_by_request[key]["billed"] + batch_calls_by_custom_id[batch_custom_id(key)]["billed"]`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

HEADER = "x-gateway-request-id"
DEFAULT_MAX_TRACKED = 1_000_000
MAX_KEY_CHARS = 256

_FIELD_BITS = 32
_OK = 1
_BILLED = 1 << _FIELD_BITS
_ALL = 1 << (2 * _FIELD_BITS)
_MASK = _BILLED - 1


def request_key(headers: Mapping[str, str], body: object) -> str | None:
    """The request a call belongs to: the gateway's header, else `metadata.user_id`, else None."""
    key = headers.get(HEADER)
    if not key and isinstance(body, Mapping):
        metadata = body.get("metadata")
        if isinstance(metadata, Mapping):
            user_id = metadata.get("user_id")
            if isinstance(user_id, str):
                key = user_id
    if not key:
        return None
    if len(key) > MAX_KEY_CHARS:
        return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return key


def batch_custom_id(request_key: str) -> str:
    """The custom_id of a request's batch entry: SHA-256 of `<partner_id>:<request_id>`, in hex
    (64 characters of `[0-9a-f]`, which the API's `[A-Za-z0-9_-]{1,64}` admits)."""
    return hashlib.sha256(request_key.encode("utf-8", "surrogateescape")).hexdigest()


def _unpack(packed: int) -> tuple[int, int, int]:
    return packed & _MASK, (packed >> _FIELD_BITS) & _MASK, packed >> (2 * _FIELD_BITS)


class RequestCalls:
    """Per-request `ok` / `billed` / `all` counts, bounded by `max_entries` keys."""

    def __init__(self, max_entries: int = DEFAULT_MAX_TRACKED) -> None:
        self.max_entries = max_entries
        self._counts: dict[str, int] = {}
        self.unkeyed_calls = 0
        self.untracked_calls = 0
        self.ok_more_than_once = 0
        self.billed_more_than_once = 0

    def __len__(self) -> int:
        return len(self._counts)

    def record(self, key: str | None, *, ok: bool, billed: bool) -> None:
        """Count one call for `key` (`ok` implies `billed`)."""
        if key is None:
            self.unkeyed_calls += 1
            return
        counts = self._counts
        before = counts.get(key)
        if before is None:
            if len(counts) >= self.max_entries:
                self.untracked_calls += 1
                return
            before = 0
        billed = billed or ok
        after = before + _ALL + (_BILLED if billed else 0) + (_OK if ok else 0)
        counts[key] = after
        if ok and before & _MASK == 1:
            self.ok_more_than_once += 1
        if billed and (before >> _FIELD_BITS) & _MASK == 1:
            self.billed_more_than_once += 1

    def get(self, key: str) -> dict[str, int] | None:
        """The counts of one key, or None when it is not tracked."""
        packed = self._counts.get(key)
        if packed is None:
            return None
        ok, billed, every = _unpack(packed)
        return {"ok": ok, "billed": billed, "all": every}

    def items(
        self, min_ok: int = 0, min_billed: int = 0, min_all: int = 0
    ) -> Iterator[tuple[str, int, int, int]]:
        """(key, ok, billed, all) of the keys at or above the given minimums."""
        for key, packed in self._counts.items():
            ok, billed, every = _unpack(packed)
            if ok >= min_ok and billed >= min_billed and every >= min_all:
                yield key, ok, billed, every

    def summary(self) -> dict[str, int]:
        """Totals for `GET /_sim/stats` (constant time: no scan of the keys)."""
        return {
            "tracked": len(self._counts),
            "max_tracked": self.max_entries,
            "ok_more_than_once": self.ok_more_than_once,
            "billed_more_than_once": self.billed_more_than_once,
            "unkeyed_calls": self.unkeyed_calls,
            "untracked_calls": self.untracked_calls,
        }

    def by_key(self, min_ok: int = 0, min_billed: int = 0, min_all: int = 0) -> dict[str, dict[str, int]]:
        """`{key: {"ok", "billed", "all"}}` of the keys at or above the given minimums."""
        return {
            key: {"ok": ok, "billed": billed, "all": every}
            for key, ok, billed, every in self.items(min_ok, min_billed, min_all)
        }

    def as_dict(self, min_ok: int = 0, min_billed: int = 0, min_all: int = 0) -> dict[str, Any]:
        """The summary plus `calls_by_request` (filtered by the minimums), JSON-ready."""
        return {**self.summary(), "calls_by_request": self.by_key(min_ok, min_billed, min_all)}
