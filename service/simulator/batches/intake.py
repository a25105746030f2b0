"""Batch-level checks of `POST /v1/messages/batches`: what makes the whole batch a 400.

The body is `{"requests": [{"custom_id": ..., "params": {...}}, ...]}`, at most
`max_requests` entries (100,000) and `max_bytes` (256 MB, checked as the body is read).
`custom_id` matches `[A-Za-z0-9_-]{1,64}` and is unique in the batch; `params` is an object
without `max_tokens: 0` (cache pre-warming makes no sense in a batch) or `stream: true`.

Everything else about `params` is checked per entry when the entry is processed, with the
same validation as `/v1/messages` (service/simulator/validation.py): an invalid entry ends
`errored` with the error `/v1/messages` would have answered, the rest of the batch runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from service.simulator.config import BatchSettings
from service.simulator.errors import InvalidRequestError

CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BODY_FIELDS = frozenset({"requests"})
_ENTRY_FIELDS = frozenset({"custom_id", "params"})


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message)


def too_large(limit: int) -> InvalidRequestError:
    """The answer to a body over `max_bytes`."""
    return _bad(f"The batch exceeds the maximum size of {limit} bytes (Message Batches allow 256 MB)")


def _check_entry(i: int, entry: Any, seen: set[str]) -> tuple[str, Mapping[str, Any]]:
    where = f"requests.{i}"
    if not isinstance(entry, Mapping):
        raise _bad(f"{where}: Input should be a valid dictionary")
    extra = set(entry) - _ENTRY_FIELDS
    if extra:
        raise _bad(f"{where}.{sorted(extra)[0]}: Extra inputs are not permitted")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str):
        raise _bad(f"{where}.custom_id: Field required (a string)")
    if not CUSTOM_ID.fullmatch(custom_id):
        raise _bad(f"{where}.custom_id: String should match pattern '^{CUSTOM_ID.pattern}$'")
    if custom_id in seen:
        raise _bad(f"{where}.custom_id: {custom_id!r} is used twice; custom_id must be unique in a batch")
    seen.add(custom_id)
    params = entry.get("params")
    if not isinstance(params, Mapping):
        raise _bad(f"{where}.params: Field required (an object)")
    max_tokens = params.get("max_tokens")
    if max_tokens == 0 and not isinstance(max_tokens, bool):
        raise _bad(f"{where}.params.max_tokens: must be at least 1 in a batch (no cache pre-warming)")
    if params.get("stream") is True:
        raise _bad(f"{where}.params.stream: streaming is not supported in a batch")
    return custom_id, params


def parse_batch(body: Any, settings: BatchSettings) -> tuple[list[str], list[Any]]:
    """The custom_ids and params of a create body, in request order. Raises `InvalidRequestError`."""
    if not isinstance(body, Mapping):
        raise _bad("the request body must be a JSON object")
    extra = set(body) - _BODY_FIELDS
    if extra:
        raise _bad(f"{sorted(extra)[0]}: Extra inputs are not permitted")
    requests = body.get("requests")
    if requests is None:
        raise _bad("requests: Field required")
    if not isinstance(requests, list):
        raise _bad("requests: Input should be a valid list")
    if not requests:
        raise _bad("requests: a batch needs at least 1 request")
    if len(requests) > settings.max_requests:
        raise _bad(f"requests: a batch holds at most {settings.max_requests} requests, got {len(requests)}")
    seen: set[str] = set()
    custom_ids: list[str] = []
    params: list[Any] = []
    for i, entry in enumerate(requests):
        custom_id, entry_params = _check_entry(i, entry, seen)
        custom_ids.append(custom_id)
        params.append(entry_params)
    return custom_ids, params
