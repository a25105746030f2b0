"""A Claude Messages API simulator: auth, validation, usage, prompt caching, rate-limit headers,
token buckets, latency and fault injection, over HTTP; and the Message Batches API
(`/v1/messages/batches`, in compressed time: see service/simulator/batches/).

Used by the tests, the demo and the benchmarks in place of Claude, and by
users to load test a partner setup before spending money. Run it with
`python -m service.simulator --config sim.yaml`, or in-process:

    async with SimulatorServer(SimulatorConfig(seed=1)) as sim:
        ... AsyncAnthropic(api_key="sk-...", base_url=sim.url, max_retries=0) ...
"""

from service.simulator.buckets import BucketSet, RateLimiter, Refusal, TokenBucket
from service.simulator.config import (
    BatchSettings,
    FaultSettings,
    LatencySettings,
    LimitSettings,
    OutputSettings,
    SimulatorConfig,
    SimulatorConfigError,
    load_config,
)
from service.simulator.server import SimulatorServer
from service.simulator.tokens import count_input_tokens

__all__ = [
    "BatchSettings",
    "BucketSet",
    "FaultSettings",
    "LatencySettings",
    "LimitSettings",
    "OutputSettings",
    "RateLimiter",
    "Refusal",
    "SimulatorConfig",
    "SimulatorConfigError",
    "SimulatorServer",
    "TokenBucket",
    "count_input_tokens",
    "load_config",
]
