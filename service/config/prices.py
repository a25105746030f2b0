"""The price table's model (`models:`): each model's prices, USD per million tokens, and the
built-in table used when the config gives none. How prices combine with a call's `usage` is in
service/admission/pricing.py, the one place that computes a cost.
"""

from __future__ import annotations

from pydantic import Field

from service.config.frozen import Frozen


class ModelPrice(Frozen):
    """A model's prices (USD per million tokens, by kind) and its documented output maximum.
    How they combine with `usage` is in service/admission/pricing.py."""

    input_per_mtok_usd: float = Field(ge=0)
    output_per_mtok_usd: float = Field(ge=0)
    cache_write_per_mtok_usd: float = Field(default=0.0, ge=0)
    """5-minute cache writes (Anthropic: 1.25x input)."""
    cache_write_1h_per_mtok_usd: float | None = Field(default=None, ge=0)
    """1-hour cache writes (`usage.cache_creation.ephemeral_1h_input_tokens`); None: 2x input."""
    cache_read_per_mtok_usd: float = Field(default=0.0, ge=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    """The model's documented maximum `max_tokens`; a request over it is dead-lettered
    `max_tokens_exceeded` before any call. None: not checked here (Claude answers 400)."""
    fast_multiplier: float = Field(default=6.0, gt=0)
    """`usage.speed: fast` (fast mode): every token price times this."""
    priority_multiplier: float = Field(default=1.0, gt=0)
    """`usage.service_tier: priority`: every token price times this (1: billed at the standard
    rates against the Priority Tier commitment)."""
    web_search_per_1k_usd: float = Field(default=10.0, ge=0)
    """Per 1,000 `usage.server_tool_use.web_search_requests`."""
    web_fetch_per_1k_usd: float = Field(default=0.0, ge=0)
    """Per 1,000 `usage.server_tool_use.web_fetch_requests` (Anthropic: no charge beyond tokens)."""


def _price(input_usd: float, output_usd: float, max_output_tokens: int) -> ModelPrice:
    """A model's Anthropic list prices: cache writes 1.25x (5 minutes) and 2x (1 hour) of the
    input price, cache reads 0.1x (ANTHROPIC.md, "Pricing multipliers")."""
    return ModelPrice(
        input_per_mtok_usd=input_usd,
        output_per_mtok_usd=output_usd,
        cache_write_per_mtok_usd=round(input_usd * 1.25, 9),
        cache_read_per_mtok_usd=round(input_usd / 10, 9),
        max_output_tokens=max_output_tokens,
    )


_LIST_PRICES: dict[tuple[str, ...], tuple[float, float, int]] = {
    # ids (the alias, then its snapshot): input and output USD per million tokens, and the
    # documented maximum max_tokens, from Anthropic's public pricing and models pages
    ("claude-opus-4-5", "claude-opus-4-5-20251101"): (5, 25, 64_000),
    ("claude-opus-4-1", "claude-opus-4-1-20250805"): (15, 75, 32_000),
    ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"): (3, 15, 64_000),
    ("claude-haiku-4-5", "claude-haiku-4-5-20251001"): (1, 5, 64_000),
}
"""Models whose list prices Anthropic publishes. The SDK's newer ids (claude-opus-4-6 on) are
not listed: their prices are not published in this project's sources, and a guessed price
would bill partners wrongly. The operator adds them (`models:` in the config; the whole table
is then the config's); until then they are refused `unknown_model`, before any call."""


def default_models() -> dict[str, ModelPrice]:
    """The built-in table: `_LIST_PRICES`, every alias and snapshot id priced alike."""
    return {model_id: _price(*prices) for ids, prices in _LIST_PRICES.items() for model_id in ids}
