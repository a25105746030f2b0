"""Batch figures for `GET /_sim/stats` (key `batches`) and per-custom_id calls for `/_sim/calls`.

Batch entries are billed at the batch tier (50% of the standard price), so their tokens are
counted here and not in the stats' `input_tokens_total` / `output_tokens_total`, which stay
standard-tier. Every entry counts once in `calls` under its `custom_id` when it ends: a
succeeded entry as `ok` and `billed`, any other outcome in `all` only (see calls.py); a
custom_id billed in two batches shows `billed: 2` and in `billed_more_than_once`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from service.simulator.calls import DEFAULT_MAX_TRACKED, RequestCalls


class BatchStats:
    """Counters since the last reset; `as_dict` gives the JSON-ready view."""

    def __init__(self, max_tracked: int = DEFAULT_MAX_TRACKED) -> None:
        self.calls = RequestCalls(max_tracked)
        self.created = 0
        self.requests_received = 0
        self.ended = 0
        self.cancels = 0
        self.deleted = 0
        self.queue_limited_429 = 0
        self.results: Counter[str] = Counter()
        self.errored_by_type: Counter[str] = Counter()
        self.succeeded_by_model: Counter[str] = Counter()
        self.input_tokens = 0
        self.output_tokens = 0
        self.billed_by_key: dict[str, list[int]] = {}

    def succeeded(
        self, custom_id: str, key_name: str, model: str, input_tokens: int, output_tokens: int
    ) -> None:
        """An entry succeeded: billed at the batch tier, one billed call of its custom_id."""
        self.results["succeeded"] += 1
        self.succeeded_by_model[model] += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if key_name in self.billed_by_key or len(self.billed_by_key) < 10_000:
            billed = self.billed_by_key.setdefault(key_name, [0, 0, 0])
            billed[0] += 1
            billed[1] += input_tokens
            billed[2] += output_tokens
        self.calls.record(custom_id, ok=True, billed=True)

    def unbilled(self, custom_id: str, result: str, error_type: str | None = None) -> None:
        """An entry ended `errored` (with `error_type`), `canceled` or `expired`: nothing billed."""
        self.results[result] += 1
        if error_type is not None:
            self.errored_by_type[error_type] += 1
        self.calls.record(custom_id, ok=False, billed=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counters (the engine adds the current `in_progress` and `processing`)."""
        return {
            "created": self.created,
            "requests_received": self.requests_received,
            "ended": self.ended,
            "cancels": self.cancels,
            "deleted": self.deleted,
            "queue_limited_429": self.queue_limited_429,
            "request_counts": {
                name: self.results[name] for name in ("succeeded", "errored", "canceled", "expired")
            },
            "errored_by_type": dict(self.errored_by_type),
            "succeeded_by_model": dict(self.succeeded_by_model),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "billed_by_key": {
                k: {"requests": r, "input_tokens": i, "output_tokens": o}
                for k, (r, i, o) in self.billed_by_key.items()
            },
        }
