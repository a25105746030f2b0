"""Run the gateway with a bench-only limiter: `python -m bench.run_gateway --config X --naive`.

The naive limiter is what the limits benchmark compares the product against:
a per-partner token bucket holding a static share of the org limits, blind to
the upstream's rate-limit headers and to its 429s. Not part of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Mapping

from service.app import Gateway
from service.config.loader import load_config
from service.config.settings import LimitSettings
from service.scheduling.limiter import Cost, Decision, LocalLimiter, Usage
from service.scheduling.pools import DEFAULT_CLASS, LimitConfig, PauseScope
from service.telemetry.logs import configure_logging


class NaiveLimiter:
    """Per-partner buckets of limit / partners each; no org view, no header sync, no 429 pause,
    no model classes (every partner's share of the default pool, whatever the model)."""

    def __init__(self, config: LimitConfig) -> None:
        self._inner = LocalLimiter(self._split(config))

    @staticmethod
    def _split(config: LimitConfig) -> LimitConfig:
        org = config.pool(DEFAULT_CLASS)
        n = max(1, len(config.partners))
        share = LimitSettings(
            rpm=org.rpm // n if org.rpm else None,
            itpm=org.itpm // n if org.itpm else None,
            otpm=org.otpm // n if org.otpm else None,
        )
        return LimitConfig.simple(LimitSettings(), dict.fromkeys(config.partners, share))

    async def acquire(self, partner_id: str, cost: Cost) -> Decision:
        return self._inner.try_acquire(partner_id, Cost(cost.input_tokens, cost.output_tokens))

    def settle(self, partner_id: str, cost: Cost, usage: Usage | None) -> None:
        self._inner.settle(partner_id, Cost(cost.input_tokens, cost.output_tokens), usage)

    def observe_headers(self, partner_id: str, cost: Cost, headers: Mapping[str, str]) -> None:
        pass  # naive: ignores the upstream's view

    def pause(self, scope: PauseScope, seconds: float) -> None:
        pass  # naive: a 429 only delays the one request (its retry-after)

    def configure(self, config: LimitConfig) -> None:
        self._inner.configure(self._split(config))

    def levels(self) -> dict[tuple[str, str], float]:
        return self._inner.levels()


async def _serve(path: str, naive: bool) -> None:
    settings = load_config(path)
    limiter = NaiveLimiter(LimitConfig.of(settings)) if naive else None
    gateway = Gateway(settings, limiter=limiter)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.run(stop)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--naive", action="store_true")
    args = parser.parse_args()
    configure_logging("WARNING")
    asyncio.run(_serve(args.config, args.naive))


if __name__ == "__main__":
    main()
