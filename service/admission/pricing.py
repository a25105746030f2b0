"""What a call costs: the one place prices meet `usage` (budgets and the cost metric use it).

A model's prices are in the config's `models` table (`ModelPrice`, USD per million tokens).
What a billed call costs, from the response's `usage`:

    tokens  = input + output + cache reads + cache writes (5-minute and 1-hour)
    usd     = (input x input price + output x output price + cache reads x read price
               + 5-minute writes x write price + 1-hour writes x 1-hour write price)
              x tier x speed
              + web searches x search price + web fetches x fetch price

- tier: `usage.service_tier` `batch` is half price (ANTHROPIC.md: everything at 50%);
  `priority` is the model's `priority_multiplier` (1 by default); `standard` or none is 1;
- speed: `usage.speed` `fast` (fast mode) is the model's `fast_multiplier`;
- server tools: `usage.server_tool_use.web_search_requests` and `web_fetch_requests`, priced
  per 1,000, whatever the tier or speed.

The reservation made before a call (`estimate`) prices the estimated input and all of
`max_tokens` as output, at the fast-mode price when the request asks for `speed: fast`; the
server tools' fees are only known after the call and are settled then.

Amounts are integers of nano-USD, so Redis and Lua add them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.config.settings import ModelPrice

NANO_PER_USD = 1_000_000_000
BATCH_MULTIPLIER = 0.5
_NANO_PER_MTOK_USD = 1_000
"""USD per million tokens, times tokens, times this: nano-USD."""


@dataclass(frozen=True, slots=True)
class Amount:
    tokens: int
    nusd: int
    """nano-USD (1e-9 USD): integers, so Redis and Lua add them exactly."""

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.tokens - other.tokens, self.nusd - other.nusd)

    def __neg__(self) -> Amount:
        return Amount(-self.tokens, -self.nusd)

    @property
    def usd(self) -> float:
        return self.nusd / NANO_PER_USD


@dataclass(frozen=True, slots=True)
class Billed:
    """The billed quantities of one `usage` object."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    web_search: int = 0
    web_fetch: int = 0
    service_tier: str | None = None
    speed: str | None = None

    @property
    def cache_write(self) -> int:
        return self.cache_write_5m + self.cache_write_1h

    @property
    def tokens(self) -> int:
        return self.input + self.output + self.cache_read + self.cache_write


def _int(mapping: Mapping[str, Any] | None, key: str) -> int:
    value = mapping.get(key) if isinstance(mapping, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def billed(usage: Mapping[str, Any]) -> Billed:
    """Read `usage` as Anthropic documents it; anything missing or malformed counts 0. Cache
    writes without the `cache_creation` breakdown are 5-minute writes."""
    writes = _int(usage, "cache_creation_input_tokens")
    breakdown = usage.get("cache_creation")
    one_hour = min(writes, _int(breakdown, "ephemeral_1h_input_tokens"))
    tools = usage.get("server_tool_use")
    tier, speed = usage.get("service_tier"), usage.get("speed")
    return Billed(
        input=_int(usage, "input_tokens"),
        output=_int(usage, "output_tokens"),
        cache_read=_int(usage, "cache_read_input_tokens"),
        cache_write_5m=writes - one_hour,
        cache_write_1h=one_hour,
        web_search=_int(tools, "web_search_requests"),
        web_fetch=_int(tools, "web_fetch_requests"),
        service_tier=tier if isinstance(tier, str) else None,
        speed=speed if isinstance(speed, str) else None,
    )


def multiplier(price: ModelPrice, service_tier: str | None, speed: str | None) -> float:
    """What the tier and the speed multiply every token price by."""
    tier = {"batch": BATCH_MULTIPLIER, "priority": price.priority_multiplier}.get(service_tier or "", 1.0)
    return tier * (price.fast_multiplier if speed == "fast" else 1.0)


def estimate(
    price: ModelPrice | None,
    est_input_tokens: int,
    max_tokens: int,
    *,
    speed: str | None = None,
    service_tier: str | None = None,
) -> Amount:
    """The reservation: estimated input at the input price, `max_tokens` at the output price,
    at the fast-mode price if the request asks for it, at batch price for a batch."""
    tokens = est_input_tokens + max_tokens
    if price is None:
        return Amount(tokens, 0)
    per_mtok = est_input_tokens * price.input_per_mtok_usd + max_tokens * price.output_per_mtok_usd
    nusd = per_mtok * multiplier(price, service_tier, speed) * _NANO_PER_MTOK_USD
    return Amount(tokens, math.ceil(nusd))


def actual(price: ModelPrice | None, usage: Mapping[str, Any]) -> Amount:
    """What a call cost: every billed token at the price of its kind, tier and speed, plus
    the server tools' fees."""
    b = billed(usage)
    if price is None:
        return Amount(b.tokens, 0)
    one_hour_price = price.cache_write_1h_per_mtok_usd
    if one_hour_price is None:
        one_hour_price = 2 * price.input_per_mtok_usd
    per_mtok = (
        b.input * price.input_per_mtok_usd
        + b.output * price.output_per_mtok_usd
        + b.cache_read * price.cache_read_per_mtok_usd
        + b.cache_write_5m * price.cache_write_per_mtok_usd
        + b.cache_write_1h * one_hour_price
    )
    tokens_nusd = per_mtok * multiplier(price, b.service_tier, b.speed) * _NANO_PER_MTOK_USD
    tools_usd = (b.web_search * price.web_search_per_1k_usd + b.web_fetch * price.web_fetch_per_1k_usd) / 1000
    return Amount(b.tokens, round(tokens_nusd + tools_usd * NANO_PER_USD))


def cost_usd(price: ModelPrice, usage: Mapping[str, Any]) -> float:
    """What a call cost in USD (`actual`, as a float for the cost metric)."""
    return actual(price, usage).usd
