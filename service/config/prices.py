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


def default_models() -> dict[str, ModelPrice]:
    return {
        "claude-opus-4-1": ModelPrice(
            input_per_mtok_usd=15,
            output_per_mtok_usd=75,
            cache_write_per_mtok_usd=18.75,
            cache_read_per_mtok_usd=1.5,
            max_output_tokens=32_000,
        ),
        "claude-sonnet-4-5": ModelPrice(
            input_per_mtok_usd=3,
            output_per_mtok_usd=15,
            cache_write_per_mtok_usd=3.75,
            cache_read_per_mtok_usd=0.3,
            max_output_tokens=64_000,
        ),
        "claude-haiku-4-5": ModelPrice(
            input_per_mtok_usd=1,
            output_per_mtok_usd=5,
            cache_write_per_mtok_usd=1.25,
            cache_read_per_mtok_usd=0.1,
            max_output_tokens=64_000,
        ),
    }
