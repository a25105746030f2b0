"""Budget spend for the Redis tests: a registry with one budgeted partner, and calls that
reserve 1,000 tokens and are billed 300 each."""

from __future__ import annotations

from service.admission.budget import Budgets, Reservation
from service.admission.pricing import actual
from service.admission.registry import Registry
from service.config.loader import parse_config

NOON = 1_795_521_600.0  # 2026-11-24T12:00:00Z
DAY_KEY = "budget:acme:day:2026-11-24"
"""The day counter's key at NOON, after the `{prefix}:`."""


def budgeted_registry() -> Registry:
    settings = parse_config(
        {"partners": [{"id": "acme", "api_key": {"env": "K"}, "budget": {"tokens_per_day": 10_000_000}}]}
    )
    return Registry.build(settings, environ={"K": "sk"})


class _Admitted:
    """What `Budgets.reserve` reads of an admitted request."""

    def __init__(self, est: int, max_tokens: int) -> None:
        self.request_id, self.model = "r", "claude-haiku-4-5"
        self.est_input_tokens, self.max_tokens = est, max_tokens
        self.params: dict[str, object] = {"model": self.model, "max_tokens": max_tokens}


async def spend(budgets: Budgets, registry: Registry, n: int) -> int:
    """n calls reserving 1,000 tokens and billed 300 each: returns the tokens billed."""
    price = registry.settings.models["claude-haiku-4-5"]
    for _ in range(n):
        res = await budgets.reserve(registry.by_id["acme"], _Admitted(900, 100), wait=False)  # type: ignore[arg-type]
        assert isinstance(res, Reservation)
        await budgets.settle(res, actual(price, {"input_tokens": 200, "output_tokens": 100}))
    return n * 300
