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
from service.telemetry.logs import configure_logging


class NaiveLimiter:
    """Per-partner buckets of limit / partners each; no org view, no header sync, no 429 pause."""

    def __init__(self, org: LimitSettings, partners: Mapping[str, LimitSettings]) -> None:
        self._inner = LocalLimiter(LimitSettings(), self._split(org, partners))

    @staticmethod
    def _split(org: LimitSettings, partners: Mapping[str, LimitSettings]) -> dict[str, LimitSettings]:
        n = max(1, len(partners))
        share = LimitSettings(
            rpm=org.rpm // n if org.rpm else None,
            itpm=org.itpm // n if org.itpm else None,
            otpm=org.otpm // n if org.otpm else None,
        )
        return dict.fromkeys(partners, share)

    async def acquire(self, partner_id: str, cost: Cost) -> Decision:
        return self._inner.try_acquire(partner_id, cost)

    def settle(self, partner_id: str, cost: Cost, usage: Usage | None) -> None:
        self._inner.settle(partner_id, cost, usage)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        pass  # naive: ignores the upstream's view

    def pause(self, seconds: float) -> None:
        pass  # naive: a 429 only delays the one request (its retry-after)

    def configure(self, org: LimitSettings, partners: Mapping[str, LimitSettings]) -> None:
        self._inner.configure(LimitSettings(), self._split(org, partners))

    def levels(self) -> dict[tuple[str, str], float]:
        return self._inner.levels()


async def _serve(path: str, naive: bool) -> None:
    settings = load_config(path)
    limiter = (
        NaiveLimiter(settings.org_limits, {p.id: p.limits for p in settings.partners}) if naive else None
    )
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
