"""A token bucket that refills continuously, as Anthropic's limits do.

Capacity is the per-minute limit; it refills at limit/60 per second. A cost
larger than the capacity is admitted when the bucket is full (the level goes
negative), so one huge request is slow, never stuck. The clock is injected.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    capacity: float
    level: float
    updated: float

    @classmethod
    def per_minute(cls, limit: float, now: float, share: float = 1.0) -> TokenBucket:
        cap = limit * share
        return cls(cap, cap, now)

    @property
    def rate(self) -> float:
        """Refill per second."""
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0 if now)."""
        self.refill(now)
        need = min(amount, self.capacity)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate if self.rate > 0 else float("inf")

    def take(self, amount: float) -> None:
        self.level -= amount

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)

    def clamp(self, remaining: float, now: float) -> None:
        """Follow the upstream: never believe in more than it says is left."""
        self.refill(now)
        if remaining < self.level:
            self.level = remaining

    def resize(self, capacity: float, now: float) -> None:
        self.refill(now)
        if capacity != self.capacity:
            self.level = min(capacity, self.level + max(0.0, capacity - self.capacity))
            self.capacity = capacity
