"""Counters behind `GET /_sim/stats`.

Keys are reported by their configured *name*, never by value; with no keys
configured (any key accepted) a key is reported as `key-<sha256 prefix>`.
Token totals count what Anthropic would bill: calls that did their work,
whether answered (200) or dropped after the work. Calls per request (the
gateway's `x-gateway-request-id`, or `metadata.user_id`) are in `requests`
(see service/simulator/calls.py); the stats show only their totals, the
per-request map is served by `GET /_sim/calls`. Message Batches have their own figures
under `batches` (service/simulator/batches/stats.py): their tokens are billed at the batch
tier, so `input_tokens_total` and `output_tokens_total` count standard-tier calls only.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from service.simulator.batches.stats import BatchStats
from service.simulator.calls import DEFAULT_MAX_TRACKED, RequestCalls

DROPPED = "dropped"


class SimulatorStats:
    """Mutable counters; `as_dict` gives the JSON-ready view."""

    def __init__(self, max_tracked_requests: int = DEFAULT_MAX_TRACKED) -> None:
        self.requests = RequestCalls(max_tracked_requests)
        self.batches = BatchStats(max_tracked_requests)
        self.reset()

    def reset(self) -> None:
        """Zero every counter (the per-request counts too; their cap is kept)."""
        self.requests = RequestCalls(self.requests.max_entries)
        self.batches = BatchStats(self.requests.max_entries)
        self.started_at = time.time()
        self.calls_total = 0
        self.in_flight = 0
        self.calls_by_endpoint: Counter[str] = Counter()
        self.calls_by_key: Counter[str] = Counter()
        self.calls_by_model: Counter[str] = Counter()
        self.status_counts: Counter[str] = Counter()
        self.rate_limited_429 = 0
        self.spend_limit_429 = 0
        self.input_tokens_total = 0
        self.output_tokens_total = 0
        self.billed_by_key: dict[str, list[int]] = {}
        self.count_tokens_input_tokens_total = 0

    def call(self, endpoint: str) -> None:
        """A call arrived."""
        self.calls_total += 1
        self.calls_by_endpoint[endpoint] += 1

    def identified(self, key_name: str | None, model: str | None) -> None:
        """The call's key (by name) and model are known."""
        if key_name is not None:
            self.calls_by_key[key_name] += 1
        if model is not None:
            self.calls_by_model[model] += 1

    def status(self, status: int | str) -> None:
        """The call ended with `status` (an HTTP status or `DROPPED`)."""
        self.status_counts[str(status)] += 1

    def billed(self, input_tokens: int, output_tokens: int, key_name: str | None = None) -> None:
        """A call did its work (with the key named `key_name`)."""
        self.input_tokens_total += input_tokens
        self.output_tokens_total += output_tokens
        if key_name is not None and (key_name in self.billed_by_key or len(self.billed_by_key) < 10_000):
            billed = self.billed_by_key.setdefault(key_name, [0, 0, 0])
            billed[0] += 1
            billed[1] += input_tokens
            billed[2] += output_tokens

    def set_max_tracked(self, max_entries: int) -> None:
        """Change how many requests (and custom_ids) are counted one by one."""
        self.requests.max_entries = max_entries
        self.batches.calls.max_entries = max_entries

    def calls(self, min_ok: int = 0, min_billed: int = 0, min_all: int = 0) -> dict[str, Any]:
        """`GET /_sim/calls`: calls per request and per batch custom_id, filtered by the minimums."""
        data = self.requests.as_dict(min_ok, min_billed, min_all)
        data["batch_calls"] = self.batches.calls.summary()
        data["batch_calls_by_custom_id"] = self.batches.calls.by_key(min_ok, min_billed, min_all)
        return data

    def as_dict(self) -> dict[str, Any]:
        """The stats as plain JSON-ready data (buckets are added by the server)."""
        return {
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "calls_total": self.calls_total,
            "in_flight": self.in_flight,
            "calls_by_endpoint": dict(self.calls_by_endpoint),
            "calls_by_key": dict(self.calls_by_key),
            "calls_by_model": dict(self.calls_by_model),
            "status_counts": dict(self.status_counts),
            "rate_limited_429": self.rate_limited_429,
            "spend_limit_429": self.spend_limit_429,
            "input_tokens_total": self.input_tokens_total,
            "output_tokens_total": self.output_tokens_total,
            "billed_by_key": {
                k: {"requests": r, "input_tokens": i, "output_tokens": o}
                for k, (r, i, o) in self.billed_by_key.items()
            },
            "count_tokens_input_tokens_total": self.count_tokens_input_tokens_total,
            "request_calls": self.requests.summary(),
            "batches": self.batches.as_dict(),
            "batch_calls": self.batches.calls.summary(),
        }
