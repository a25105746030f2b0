"""The `anthropic-ratelimit-*` headers, built from a bucket set.

For each of `requests`, `input-tokens`, `output-tokens`: `-limit` (per minute),
`-remaining` (whole units; tokens rounded to the nearest thousand when
`round_remaining`, as Anthropic does) and `-reset` (RFC 3339 UTC time at
which the bucket is full again, rounded up to the second). The `tokens-*`
trio repeats whichever of input/output has the fewest tokens remaining.
An unlimited bucket reports `UNLIMITED_HEADER_VALUE` and a reset of now. A key in a
workspace reports, per dimension, the workspace's or the org's, whichever has less left.
"""

from __future__ import annotations

import math
import time

from service.simulator.buckets import UNLIMITED_HEADER_VALUE, BucketSet, KeyedBuckets, TokenBucket

_NAMES = tuple(
    tuple(f"anthropic-ratelimit-{kind}-{field}" for field in ("limit", "remaining", "reset"))
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
)
_rfc3339_cache: dict[int, str] = {}


def rfc3339(epoch_s: float) -> str:
    """`epoch_s` as an RFC 3339 UTC time, rounded up to the second: `2025-01-31T12:00:05Z`."""
    sec = math.ceil(epoch_s)
    text = _rfc3339_cache.get(sec)
    if text is None:
        if len(_rfc3339_cache) > 256:
            _rfc3339_cache.clear()
        text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec))
        _rfc3339_cache[sec] = text
    return text


def round_thousand(value: float) -> int:
    """Round half up to the nearest thousand, never below zero."""
    if value <= 0:
        return 0
    return int(value / 1000.0 + 0.5) * 1000


def _trio(bucket: TokenBucket, wall_now: float, rounded: bool) -> tuple[int, int, str]:
    if bucket.unlimited:
        return UNLIMITED_HEADER_VALUE, UNLIMITED_HEADER_VALUE, rfc3339(wall_now)
    level = bucket.level()
    remaining = round_thousand(level) if rounded else max(0, int(level))
    full_in = max(0.0, (bucket.capacity - level)) / (bucket.capacity / 60.0)
    return int(bucket.capacity), remaining, rfc3339(wall_now + full_in)


def ratelimit_headers(buckets: BucketSet, wall_now: float, round_remaining: bool = True) -> dict[str, str]:
    """All twelve `anthropic-ratelimit-*` headers for `buckets` at wall-clock time `wall_now`."""
    requests, input_tokens, output_tokens = (
        buckets.tightest()
        if isinstance(buckets, KeyedBuckets)
        else (buckets.requests, buckets.input_tokens, buckets.output_tokens)
    )
    req = _trio(requests, wall_now, False)
    inp = _trio(input_tokens, wall_now, round_remaining)
    out = _trio(output_tokens, wall_now, round_remaining)
    tok = inp if inp[1] <= out[1] else out
    headers: dict[str, str] = {}
    for (limit_name, remaining_name, reset_name), (limit, remaining, reset) in zip(
        _NAMES, (req, tok, inp, out), strict=True
    ):
        headers[limit_name] = str(limit)
        headers[remaining_name] = str(remaining)
        headers[reset_name] = reset
    return headers
