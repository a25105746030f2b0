"""The service's retry policy: exponential backoff with full jitter, bounded.

The SDK runs with `max_retries=0`; this policy decides whether and when to try
again, and every retry goes back through the limiter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from service.config.settings import RetrySettings


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    settings: RetrySettings
    rng: random.Random = random.Random()  # noqa: RUF009 - one shared, seedable in tests

    def delay_s(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based).

        `retry-after` from the server wins when present (capped), else full
        jitter over an exponentially growing ceiling.
        """
        s = self.settings
        if retry_after_s is not None:
            return min(retry_after_s, s.max_retry_after_s)
        ceiling = min(s.max_delay_s, s.base_delay_s * (2 ** (attempt - 1)))
        return self.rng.uniform(0, ceiling)

    def should_retry(self, attempt: int, elapsed_s: float, next_delay_s: float) -> bool:
        """Whether another attempt is allowed after `attempt` attempts took `elapsed_s`."""
        s = self.settings
        return attempt < s.max_attempts and elapsed_s + next_delay_s <= s.max_elapsed_s
