"""Random draws for a successful call: output length and latency.

All draws come from the simulator's single seeded `random.Random`, and a
fixed setting draws nothing, so that a seed reproduces a run exactly.
"""

from __future__ import annotations

import math
import random

from service.simulator.config import LatencySettings, OutputSettings


def draw_output_tokens(rng: random.Random, output: OutputSettings) -> int:
    """How many tokens the simulated model wants to write (before `max_tokens`)."""
    if output.distribution == "fixed":
        return output.fixed_tokens
    if output.distribution == "uniform":
        return rng.randint(output.min_tokens, output.max_tokens)
    return max(1, round(output.median_tokens * math.exp(output.sigma * rng.gauss(0.0, 1.0))))


def draw_latency_s(rng: random.Random, latency: LatencySettings, output_tokens: int) -> float:
    """Seconds to hold the answer back; 0.0 means answer at once (no sleep)."""
    if latency.distribution == "fixed":
        base = latency.fixed_s
    else:
        base = latency.median_s * math.exp(latency.sigma * rng.gauss(0.0, 1.0))
    total = base + latency.per_output_token_s * output_tokens
    return min(total, latency.max_s)
