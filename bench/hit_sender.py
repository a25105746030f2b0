"""Partners' producer for `bench.response_cache`, in a process of its own: partners produce
from their own machines, so the measured gateway's event loop does not also run their sends.

Reads one JSON plan on stdin: `bootstrap`, `topic`, `partitions`, `params` (the request params,
reused in turn), `first` (the first request id's number), `seed`, and `phases`, each
`[rate_per_s, count, arrivals]`. For each phase it sends `count` requests `h{n}` at `rate_per_s`,
as `arrivals` says (`ARRIVALS`), once a line comes on stdin (the caller is ready to measure
it), flushes, and prints `sent <count>`.

    python -m bench.hit_sender < plan.json
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from bench import traffic

ARRIVALS = ("keyed", "poisson", "paced")
"""How hits arrive: `keyed`, exponential gaps, each to the partition its key hashes to (the
producer's default partitioner, as `claude_gateway_client` sends); `poisson`, exponential gaps,
each to a partition drawn at random; `paced`, evenly spaced over the partitions in turn."""


async def send_phase(
    producer: AIOKafkaProducer,
    topic: str,
    partitions: int,
    params: list[dict[str, Any]],
    rng: random.Random,
    rate: float,
    count: int,
    arrivals: str,
    first: int,
) -> int:
    """Send `count` hits `h{first}`... at `rate` and flush; returns the next hit's number."""
    t0 = time.perf_counter()
    due = 0.0
    for i in range(count):
        due = i / rate if arrivals == "paced" else due + rng.expovariate(rate)
        delay = t0 + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        n = first + i
        part: int | None = None  # keyed: the producer's partitioner
        if arrivals == "paced":
            part = n % partitions
        elif arrivals == "poisson":
            part = rng.randrange(partitions)
        value = traffic.request_value(f"h{n}", params[n % len(params)])
        await producer.send(topic, value, key=f"h{n}".encode(), partition=part)
    await producer.flush()
    return first + count


async def _send(plan: dict[str, Any]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=plan["bootstrap"], acks="all", linger_ms=0, max_request_size=2 << 20
    )
    await producer.start()
    rng = random.Random(plan["seed"])
    topic, partitions, params = plan["topic"], int(plan["partitions"]), plan["params"]
    sent = int(plan["first"])
    loop = asyncio.get_running_loop()
    try:
        for rate, count, arrivals in plan["phases"]:
            await loop.run_in_executor(None, sys.stdin.readline)  # the caller measures from now
            sent = await send_phase(producer, topic, partitions, params, rng, rate, count, arrivals, sent)
            print(f"sent {count}", flush=True)
    finally:
        await producer.stop()


def main() -> int:
    plan = orjson.loads(sys.stdin.readline())
    asyncio.run(_send(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
