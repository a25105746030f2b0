"""What a call costs: the one place prices meet `usage` (responses, metering, budgets, the metric).

A model's prices are in the config's `models` table (`ModelPrice`, USD per million tokens).
What a billed call costs, from the response's `usage`, one part per kind:

    input           input_tokens             x input price            x tier x speed
    output          output_tokens            x output price           x tier x speed
    cache_read      cache_read_input_tokens  x cache read price       x tier x speed
    cache_write_5m  5-minute cache writes    x cache write price      x tier x speed
    cache_write_1h  1-hour cache writes      x 1-hour write price     x tier x speed
    web_search      web_search_requests      x search price / 1,000
    web_fetch       web_fetch_requests       x fetch price / 1,000

- tier: `usage.service_tier` `batch` is half price (ANTHROPIC.md: everything at 50%);
  `priority` is the model's `priority_multiplier` (1 by default); `standard` or none is 1;
- speed: `usage.speed` `fast` (fast mode) is the model's `fast_multiplier`;
- server tools: `usage.server_tool_use`, priced per 1,000, whatever the tier or speed.

**Exact to the nano-USD.** Prices are read as the decimals the config wrote (`0.3`, not the
nearest binary float), each part is computed in decimal and rounded once to whole nano-USD
(1e-9 USD, half up), and the total is the sum of the parts: the `cost` a response carries,
its metering record, the budget ledger and `gateway_cost_usd_total` all take the same integer
(`quote`), so they agree to the nano-USD, not merely to the cent.

**Cache writes by TTL** (`cache_split`): `usage.cache_creation.ephemeral_5m_input_tokens` and
`ephemeral_1h_input_tokens` where present. Without that breakdown every write is a 5-minute
write; with only the 1-hour figure, the rest of `cache_creation_input_tokens` is 5-minute.
Inconsistent figures are read so that no figure is under-billed: each TTL is billed at least
the tokens reported for it, the writes in all at least `cache_creation_input_tokens`, and a
remainder no TTL figure explains is billed as 1-hour writes (the dearer) when the 5-minute
figure is given (so it cannot be those), as 5-minute writes otherwise.

**Price version**: `price_version(settings)` names the prices a cost was computed with: the
config's `price_version`, or `auto-` and 12 hex digits of the SHA-256 of the `models` prices,
so any change of a price changes it.

The reservation made before a call (`estimate`) prices the estimated input and all of
`max_tokens` as output, at the fast-mode price when the request asks for `speed: fast`; the
server tools' fees are only known after the call and are settled then.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any, Final

import orjson

from service.config.prices import ModelPrice

if TYPE_CHECKING:
    from service.config.settings import GatewaySettings

NANO_PER_USD = 1_000_000_000
BATCH_MULTIPLIER = 0.5
_NANO_PER_MTOK_USD = 1_000
"""USD per million tokens, times tokens, times this: nano-USD."""
KINDS: Final = (
    "input",
    "output",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "web_search",
    "web_fetch",
)
"""The parts of a cost, in the order of `Quote.parts` and of the `breakdown` object."""
MODEL_NOT_PRICED: Final = "model_not_priced"
"""`cost.reason` when the model has no price in the `models` table: `usd` is null, not 0."""
CACHE_HIT: Final = "cache_hit"
"""`cost.reason` of an outcome served from the gateway's response cache: nothing billed."""


@dataclass(frozen=True, slots=True)
class Amount:
    tokens: int
    nusd: int
    """nano-USD (1e-9 USD): integers, so Redis and Lua add them exactly."""

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.tokens + other.tokens, self.nusd + other.nusd)

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

    @property
    def units(self) -> tuple[int, ...]:
        """Tokens, or requests for the server tools, in the order of `KINDS`."""
        return (
            self.input,
            self.output,
            self.cache_read,
            self.cache_write_5m,
            self.cache_write_1h,
            self.web_search,
            self.web_fetch,
        )


MAX_UNITS: Final = 1_000_000_000
"""The most of one kind a single call is billed for (a thousand times the largest context
window). An upstream figure above it (a hostile or broken upstream) is read as this many, so
every part and the total stay within 64 bits: orjson writes no larger integer (the response,
its metering record) and Redis' HINCRBY refuses one (the budget ledger, as if Redis were down)."""


def _int(mapping: Any, key: str) -> int:
    value = mapping.get(key) if isinstance(mapping, Mapping) else None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return 0
    return min(value, MAX_UNITS)


def _given(mapping: Any, key: str) -> bool:
    value = mapping.get(key) if isinstance(mapping, Mapping) else None
    return isinstance(value, int) and not isinstance(value, bool)


def cache_split(usage: Mapping[str, Any]) -> tuple[int, int]:
    """(5-minute, 1-hour) cache writes, by the rule in the module docstring."""
    if not isinstance(usage, Mapping):
        return 0, 0
    writes = _int(usage, "cache_creation_input_tokens")
    detail = usage.get("cache_creation")
    five, one = _int(detail, "ephemeral_5m_input_tokens"), _int(detail, "ephemeral_1h_input_tokens")
    rest = writes - five - one
    if rest > 0:
        if _given(detail, "ephemeral_5m_input_tokens"):
            one += rest
        else:
            five += rest
    return min(five, MAX_UNITS), min(one, MAX_UNITS)


def billed(usage: Mapping[str, Any]) -> Billed:
    """Read `usage` as Anthropic documents it; anything missing or malformed counts 0 (a
    `usage` that is not an object: all of it), a figure over `MAX_UNITS` counts `MAX_UNITS`."""
    if not isinstance(usage, Mapping):
        usage = {}
    five, one = cache_split(usage)
    tools = usage.get("server_tool_use")
    tier, speed = usage.get("service_tier"), usage.get("speed")
    return Billed(
        input=_int(usage, "input_tokens"),
        output=_int(usage, "output_tokens"),
        cache_read=_int(usage, "cache_read_input_tokens"),
        cache_write_5m=five,
        cache_write_1h=one,
        web_search=_int(tools, "web_search_requests"),
        web_fetch=_int(tools, "web_fetch_requests"),
        service_tier=tier if isinstance(tier, str) else None,
        speed=speed if isinstance(speed, str) else None,
    )


def _tier_multiplier(price: ModelPrice, service_tier: str | None) -> float:
    return {"batch": BATCH_MULTIPLIER, "priority": price.priority_multiplier}.get(service_tier or "", 1.0)


def _speed_multiplier(price: ModelPrice, speed: str | None) -> float:
    return price.fast_multiplier if speed == "fast" else 1.0


def multiplier(price: ModelPrice, service_tier: str | None, speed: str | None) -> float:
    """What the tier and the speed multiply every token price by."""
    return _tier_multiplier(price, service_tier) * _speed_multiplier(price, speed)


def _dec(value: float) -> Decimal:
    """A config number as the decimal it was written as (`0.3`, not 0.2999...)."""
    return Decimal(repr(value))


def _one_hour_price(price: ModelPrice) -> Decimal:
    one_hour = price.cache_write_1h_per_mtok_usd
    return 2 * _dec(price.input_per_mtok_usd) if one_hour is None else _dec(one_hour)


def _unit_prices_nusd(price: ModelPrice) -> tuple[Decimal, ...]:
    """nano-USD per unit of each kind (a token, or one server tool request), before multipliers."""
    per_token = _NANO_PER_MTOK_USD
    per_request = Decimal(NANO_PER_USD) / 1000
    return (
        _dec(price.input_per_mtok_usd) * per_token,
        _dec(price.output_per_mtok_usd) * per_token,
        _dec(price.cache_read_per_mtok_usd) * per_token,
        _dec(price.cache_write_per_mtok_usd) * per_token,
        _one_hour_price(price) * per_token,
        _dec(price.web_search_per_1k_usd) * per_request,
        _dec(price.web_fetch_per_1k_usd) * per_request,
    )


_TOKEN_KINDS = 5
"""The first five kinds are tokens (multiplied by tier and speed); the rest are server tools."""


@dataclass(frozen=True, slots=True)
class Quote:
    """What one call cost: nano-USD per kind (`parts`, in the order of `KINDS`), or no figure
    with a `reason`. `doc()` is the `cost` object of responses and metering records."""

    billed: Billed
    price_version: str
    parts: tuple[int, ...] | None
    """None: not priced (see `reason`)."""
    tier_multiplier: float = 1.0
    speed_multiplier: float = 1.0
    reason: str | None = None
    """Why there is no figure (`model_not_priced`) or why it is 0 (`cache_hit`); None otherwise."""

    @property
    def nusd(self) -> int | None:
        return None if self.parts is None else sum(self.parts)

    @property
    def amount(self) -> Amount:
        """What the budget ledger settles: billed tokens and nano-USD (0 when not priced)."""
        return Amount(self.billed.tokens, self.nusd or 0)

    def doc(self) -> dict[str, Any]:
        """The `cost` object (schemas/response.v1.json `cost`, schemas/usage.v1.json `cost`)."""
        nusd = self.nusd
        parts = self.parts or (None,) * len(KINDS)
        return {
            "usd": None if nusd is None else nusd / NANO_PER_USD,
            "nano_usd": nusd,
            "breakdown": {
                kind: {"units": units, "nano_usd": part}
                for kind, units, part in zip(KINDS, self.billed.units, parts, strict=True)
            },
            "service_tier": self.billed.service_tier,
            "speed": self.billed.speed,
            "multipliers": {"service_tier": self.tier_multiplier, "speed": self.speed_multiplier},
            "price_version": self.price_version,
            "reason": self.reason,
        }


def quote(
    price: ModelPrice | None,
    usage: Mapping[str, Any],
    *,
    price_version: str,
    service_tier: str | None = None,
) -> Quote:
    """What a call cost, from its `usage`, by the rules in the module docstring.

    `service_tier` prices at that tier when `usage` does not name one (a Message Batches
    result: `batch`). A model without a price gets no figure (`reason: model_not_priced`)."""
    b = billed(usage)
    if service_tier is not None and b.service_tier is None:
        b = replace(b, service_tier=service_tier)
    if price is None:
        return Quote(b, price_version, None, reason=MODEL_NOT_PRICED)
    tier, speed = _tier_multiplier(price, b.service_tier), _speed_multiplier(price, b.speed)
    token_multiplier = _dec(tier) * _dec(speed)
    parts = []
    for i, (units, unit_price) in enumerate(zip(b.units, _unit_prices_nusd(price), strict=True)):
        exact = units * unit_price * (token_multiplier if i < _TOKEN_KINDS else 1)
        parts.append(int(exact.to_integral_value(ROUND_HALF_UP)))
    return Quote(b, price_version, tuple(parts), tier, speed)


def unbilled(price_version: str, reason: str = CACHE_HIT) -> Quote:
    """A cost of 0 for an outcome no call was billed for (a response cache hit): every part
    0 nano-USD, with `reason` saying why."""
    return Quote(Billed(), price_version, (0,) * len(KINDS), reason=reason)


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
    """What a call cost as the budget ledger counts it (`quote(...).amount`)."""
    return quote(price, usage, price_version="").amount


def cost_usd(price: ModelPrice, usage: Mapping[str, Any]) -> float:
    """What a call cost in USD (`actual`, as a float)."""
    return actual(price, usage).usd


def table_version(models: Mapping[str, ModelPrice]) -> str:
    """`auto-` and 12 hex digits of the SHA-256 of the prices in `models` (not the models'
    other facts, such as `max_output_tokens`)."""
    prices = {
        name: p.model_dump(mode="json", exclude={"max_output_tokens"}) for name, p in sorted(models.items())
    }
    digest = hashlib.sha256(orjson.dumps(prices, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"auto-{digest[:12]}"


_last_table: tuple[object, str] = (None, "")


def price_version(settings: GatewaySettings) -> str:
    """The version of the prices `settings` bill at: its `price_version`, or `table_version`
    of its `models` (computed once per table)."""
    global _last_table  # a one-entry memo: settings change only on reload
    if settings.price_version is not None:
        return settings.price_version
    models, version = _last_table
    if models is not settings.models:
        version = table_version(settings.models)
        _last_table = (settings.models, version)
    return version
