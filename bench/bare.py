"""The baseline the gateway is measured against: consume -> Claude -> produce, and nothing else.

    python -m bench.bare --bootstrap HOST:PORT --topic REQ --out-topic OUT --sim-url URL --n N

What someone would write without the gateway: one aiokafka consumer in a group (manual commit
after each batch), for each record of a batch `await client.messages.create(**params)` with at most
`--concurrency` calls in flight (a semaphore, the whole batch gathered), the `Message` produced as
JSON (`model_dump_json()`) with the broker's acks awaited, then the commit. The producer has the
gateway's delivery settings (acks=all, idempotence, linger 5 ms) and the event loop is uvloop, like
the gateway's, so that the comparison measures the gateway's own work. No policy: no admission,
no limits, no retries (`max_retries=0`), no metrics. A failed call becomes a small error document
on the output topic, so that every record still gets one outcome.

Exits 0 after `--n` records (0 = run until SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

import anthropic
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True, help="request topic")
    p.add_argument("--out-topic", required=True, help="where the answers go")
    p.add_argument("--sim-url", required=True, help="Claude API base URL (the simulator)")
    p.add_argument("--n", type=int, default=0, help="exit after this many records (0 = until SIGTERM)")
    p.add_argument("--group", default="bench-bare")
    p.add_argument("--api-key", default="sk-ant-bench-bare")
    p.add_argument("--concurrency", type=int, default=64, help="Claude calls in flight at most")
    p.add_argument("--max-poll-records", type=int, default=500)
    p.add_argument("--no-uvloop", action="store_true")
    return p


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=args.max_poll_records,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    client = anthropic.AsyncAnthropic(api_key=args.api_key, base_url=args.sim_url, max_retries=0)
    calls = asyncio.Semaphore(args.concurrency)

    async def handle(rec: ConsumerRecord) -> asyncio.Future[object]:
        params = orjson.loads(rec.value)["params"]
        try:
            async with calls:
                message = await client.messages.create(**params)
            value = message.model_dump_json().encode()
        except anthropic.APIError as exc:
            value = orjson.dumps({"error": type(exc).__name__, "detail": str(exc)[:500]})
        fut: asyncio.Future[object] = await producer.send(args.out_topic, value, key=rec.key)
        return fut

    await consumer.start()
    await producer.start()
    done = 0
    try:
        while not stop.is_set() and (args.n <= 0 or done < args.n):
            batches = await consumer.getmany(timeout_ms=100)
            records = [r for recs in batches.values() for r in recs]
            if not records:
                continue
            acks = await asyncio.gather(*(handle(r) for r in records))
            await asyncio.gather(*acks)
            await consumer.commit()
            done += len(records)
    finally:
        await consumer.stop()
        await producer.stop()
        await client.close()
    print(f"bare: {done} records processed", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            return uvloop.run(run(args))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
