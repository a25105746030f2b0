"""Reading the upstream's `anthropic-ratelimit-*` headers: levels, limits, and whom a 429 is about.

Anthropic reports, on every answer, the limit and what remains of the limit in
effect for the calling key: the organisation's pool for the model's class, or a
lower workspace limit (ANTHROPIC.md: the most restrictive limit in effect). So a
reported limit below the configured org limit is about the key's workspace, not
the org; a reported limit above it means the config under-states the org's
limits, which is logged and, unless `rate_limits.follow_header_limits` (then the
pool grows to it), ignored. A limit is never shrunk below the configured one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from service.config.settings import LimitSettings
from service.scheduling.pools import ScopeKind

log = logging.getLogger(__name__)

# anthropic-ratelimit-<name>-remaining|limit -> our dimension
HEADER_DIMENSIONS = {"requests": "rpm", "input-tokens": "itpm", "output-tokens": "otpm"}
TOKEN_ROUNDING = 500.0
"""Token `remaining` values are rounded to the nearest thousand upstream."""
_SAME = 0.01
"""A reported limit within 1% of the configured one is the configured one."""

Relation = Literal["org", "below", "above", "unknown"]


def parse_ratelimit_headers(headers: Mapping[str, str]) -> dict[str, tuple[float | None, float | None]]:
    """{dimension: (limit, remaining)} from the anthropic-ratelimit-* headers present and sane."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for name, dim in HEADER_DIMENSIONS.items():
        limit = _num(headers.get(f"anthropic-ratelimit-{name}-limit"))
        remaining = _num(headers.get(f"anthropic-ratelimit-{name}-remaining"))
        if limit is not None or remaining is not None:
            out[dim] = (limit, remaining)
    return out


def _num(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


@dataclass(frozen=True, slots=True)
class Reading:
    dim: str
    limit: float | None
    remaining: float | None
    configured: float | None
    relation: Relation


def read(headers: Mapping[str, str], pool: LimitSettings) -> list[Reading]:
    """Each reported dimension, with how its limit compares to the configured org pool."""
    out = []
    for dim, (limit, remaining) in parse_ratelimit_headers(headers).items():
        configured = getattr(pool, dim)
        relation: Relation = "unknown"
        if limit is not None and configured is not None:
            if limit < configured * (1 - _SAME):
                relation = "below"
            elif limit > configured * (1 + _SAME):
                relation = "above"
            else:
                relation = "org"
        out.append(
            Reading(dim, limit, remaining, None if configured is None else float(configured), relation)
        )
    return out


def scope_of_429(headers: Mapping[str, str], pool: LimitSettings, amounts: Mapping[str, float]) -> ScopeKind:
    """Whom a 429 is about: the org pool, or the calling key's own scope (its workspace).

    The dimensions that refused are those whose `remaining` cannot cover the request. If one
    of them reports a limit below the configured org limit, a workspace limit refused: `key`.
    Otherwise, if one refused at the org's limit (or an unreported one), `org`. A 429 without
    usable headers is taken as the key's: pausing one key wrongly costs that key a pause,
    pausing the org wrongly freezes every partner.
    """
    readings = read(headers, pool)
    short = [r for r in readings if r.remaining is not None and r.remaining < _need(r.dim, amounts)]
    if any(r.relation == "below" for r in short):
        return "key"
    if short:
        return "org"
    if any(r.relation == "below" for r in readings):
        return "key"
    return "key" if not readings else "org"


_DIMENSION_NAMES = {"rpm": "requests", "itpm": "input tokens", "otpm": "output tokens"}


def over_limit(headers: Mapping[str, str], pool: LimitSettings, amounts: Mapping[str, float]) -> str | None:
    """Why a 429 will come back whatever the wait, or None: the request alone needs more of a
    per-minute limit than the limit itself (ANTHROPIC.md: a token bucket refills only up to
    its limit, and OTPM is counted from `max_tokens` when a request starts).

    - Output tokens: `max_tokens` above the reported limit. It is exact, so this holds
      whatever else was short.
    - Input tokens: the estimate above the reported limit while the bucket was full (its
      `remaining` within rounding of the limit) and no other dimension short. The estimate
      runs high, so the full bucket is the evidence that the request itself did not fit.

    Pausing the pool for such a 429 would stop every partner on it and help nobody."""
    readings = read(headers, pool)
    short = [r for r in readings if r.remaining is not None and r.remaining < _need(r.dim, amounts)]
    for r in readings:
        if r.limit is None or r.dim == "rpm":
            continue
        need = amounts.get(r.dim, 0.0)
        full = r.remaining is not None and r.remaining >= r.limit - 2 * TOKEN_ROUNDING
        if need > r.limit and (r.dim == "otpm" or (full and short == [r])):
            what = "max_tokens" if r.dim == "otpm" else "the estimated input"
            whose = "workspace" if r.relation == "below" else "organization"
            return (
                f"{what} ({need:.0f}) is more than the {_DIMENSION_NAMES[r.dim]} per minute limit "
                f"({r.limit:.0f}) of the key's {whose}: Claude refuses it at any time"
            )
    return None


def _need(dim: str, amounts: Mapping[str, float]) -> float:
    amount = max(1.0, amounts.get(dim, 1.0))
    return amount if dim == "rpm" else max(0.0, amount - TOKEN_ROUNDING)


class LimitWatch:
    """Logs, once per value, a reported limit that differs from the configured one."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, float, str]] = set()

    def note(self, pool_name: str, scope: str, r: Reading, follow: bool) -> None:
        if r.relation not in ("below", "above") or r.limit is None:
            return
        key = (pool_name, r.dim, r.limit, scope if r.relation == "below" else "")
        if key in self._seen:
            return
        if len(self._seen) > 1_000:
            self._seen.clear()
        self._seen.add(key)
        if r.relation == "above":
            log.warning(
                "the upstream reports a larger limit than configured"
                + ("; following it" if follow else "; keeping the configured limit"),
                extra={
                    "pool": pool_name,
                    "dimension": r.dim,
                    "reported": r.limit,
                    "configured": r.configured,
                },
            )
        else:
            log.warning(
                "the upstream reports a limit below the configured org limit for one key: taken as "
                "that key's workspace limit (if it is the org's, lower the configured limit)",
                extra={
                    "pool": pool_name,
                    "dimension": r.dim,
                    "reported": r.limit,
                    "configured": r.configured,
                    "scope": scope,
                },
            )
