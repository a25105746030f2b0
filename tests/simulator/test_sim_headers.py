"""Header formatting helpers: RFC 3339 times and the rounding of remaining tokens."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from service.simulator.headers import rfc3339, round_thousand


@pytest.mark.parametrize(
    ("epoch", "text"),
    [
        (0.0, "1970-01-01T00:00:00Z"),
        (1_750_000_000.0, "2025-06-15T15:06:40Z"),
        (1_750_000_000.2, "2025-06-15T15:06:41Z"),  # rounded up: never earlier than the truth
    ],
)
def test_rfc3339(epoch: float, text: str) -> None:
    assert rfc3339(epoch) == text
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo is not None
    assert parsed >= datetime.fromtimestamp(epoch, UTC).replace(microsecond=0)


@pytest.mark.parametrize(
    ("value", "rounded"),
    [(0, 0), (-5, 0), (499, 0), (500, 1_000), (1_499.9, 1_000), (1_999_994, 2_000_000), (12_345, 12_000)],
)
def test_round_thousand(value: float, rounded: int) -> None:
    assert round_thousand(value) == rounded
