"""A response cache hit's publish latency: the record received to its response committed.

The gateway runs in this process (so every hit's latency is read exactly, not from histogram
buckets) on uvloop, as `python -m service` runs it (`--response-cache-loop asyncio`: asyncio's
own loop, as the bench ran it before; six alternating pairs showed no clear difference, see
docs/exactly-once.md), with exactly-once on (the default), its `redis` section on a throwaway
redis-server, against the zero-latency simulator (a separate process) and the broker of
`bench.common.kafka()`.
One partner with `cache.enabled`:

1. warm: `--response-cache-keys` distinct requests of the realistic mix (`bench.traffic`), each
   answered by a call and stored;
2. warm-up: hits at the highest rate for `--response-cache-warmup-s` (60 s), not measured. The
   broker is a JVM started moments before: until its JIT has compiled the transaction paths,
   each transaction costs it several times the CPU, and on two cores that is the gateway's
   latency. Hits at 200/s from a cold broker, p99 per 15 s window on the 2-core development
   machine (host loop 0.6-1.0 s): 124, 54, 43, 30, then 27-42 ms from the first minute on
   (hits per transaction 2.1, 1.4, 1.3, then 1.15-1.2): a minute reaches the plateau, 30 s did
   not. A production broker has served for days. The warm-up's figures are reported
   (`warmup`), not counted;
3. hits: the same params again (new request ids), at each of `--response-cache-rates` per
   second for `--response-cache-seconds`: every one a hit. They come as partners send them
   (`--response-cache-arrivals poisson`, the default): at random, exponential gaps, each to a
   partition drawn at random, so some meet a transaction in flight and some come in bursts.
   `paced` spaces them evenly over the partitions in turn (a partition sees one every
   `partitions / rate` s, which hides the wait behind a transaction in flight). They are
   sent from a process of their own (`bench.hit_sender`), as partners produce from their own
   machines; `--response-cache-sender inline` sends them from the gateway's event loop.

A hit's latency (`hit_publish_ms`) is what `gateway_response_cache_hit_seconds` observes: from
the pipeline taking the record (`timings.received_at`, just after the fetch) to the response's
transaction committed (`sink.publish` returning), the cache lookup, the decoding and the
encoding included. Its parts: `lookup_ms` (the Redis read and the decoding) and `commit_ms`
(the response handed to its partition's writer until the writer's transaction committed: the
tick's batching, `kafka.eos_tick_ms`, and the transaction, shared with every other outcome).
Each phase (`--response-cache-rates`) is reported on its own, with `hits_per_transaction` and
`cpu_cores` (the gateway's, the broker's and the hit sender's CPU over the phase).
Target: p99 <= 20 ms. `host_python_loop_s` (`bench.common.host_loop_s`, before and after) says
how fast the host was, though not all of the development VM's slow spells. Since a transaction
begun ahead writes the last offsets again, so a tick sends its records and offsets together
(9a20ea3), five runs of `python -m bench --only cost` in one hour gave 200/s p99 16.9, 17.9,
30.3, 31.5 and 40.5 ms (p50 4.8-4.9 ms in the first two, 7.1-9.2 in the others); the code
before it 22-39 ms.

    python -m bench.response_cache [--response-cache-rates 20,200 --response-cache-eos-tick-ms 5 ...]

prints one JSON line (the `bench/__main__.py` convention: it can be added to `BENCHES`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import common, hit_sender, traffic
from bench.common import BENCH_DIR, Simulator, log
from bench.latency import percentile
from bench.limits_scale import redis_server
from service import gc_policy
from service.app import Gateway
from service.config.loader import parse_config

P99_TARGET_MS = 20.0
_NOT_STORED = ("skip_unavailable", "skip_too_large", "skip_no_room")
"""Answers of the warm phase the cache refused (`gateway_response_cache_total` results)."""
PARTNER = "cached"
SIM_ARGS = [
    "--latency-s", "0", "--rpm", "0", "--itpm", "0", "--otpm", "0", "--count-tokens-rpm", "0",
    *traffic.SIM_OUTPUT_ARGS, "--seed", "1",
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("response_cache")
    g.add_argument("--response-cache-keys", type=int, default=200, help="distinct requests stored first")
    g.add_argument(
        "--response-cache-rates",
        default="20,200",
        help="hits per second of each paced phase (comma-separated)",
    )
    g.add_argument("--response-cache-seconds", type=float, default=10.0, help="length of each phase")
    g.add_argument(
        "--response-cache-warmup-s",
        type=float,
        default=60.0,
        help="hits at the highest rate before the measured phases (not counted; 0: none)",
    )
    g.add_argument("--response-cache-partitions", type=int, default=3, help="request topic partitions")
    g.add_argument(
        "--response-cache-eos-tick-ms", type=int, default=None, help="kafka.eos_tick_ms (default: 20)"
    )
    g.add_argument(
        "--response-cache-eos-producers",
        type=int,
        default=None,
        help="kafka.eos_producers (default: 2; 1: each tick waits for the last one's markers)",
    )
    g.add_argument("--response-cache-seed", type=int, default=1, help="seed of the request mix")
    g.add_argument(
        "--response-cache-arrivals",
        choices=hit_sender.ARRIVALS,
        default="poisson",
        help="hits at random (exponential gaps) to the partitions their keys hash to (keyed), or to "
        "partitions drawn at random (poisson); or evenly spaced over the partitions (paced)",
    )
    g.add_argument(
        "--response-cache-sender",
        choices=("process", "inline"),
        default="process",
        help="hits sent by a process of their own (bench.hit_sender, as partners' producers are), "
        "or by a producer in the gateway's own event loop",
    )
    g.add_argument(
        "--response-cache-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the gateway's event loop: uvloop, as `python -m service` runs it, or asyncio's own",
    )
    g.add_argument(
        "--response-cache-at-least-once",
        action="store_true",
        help="kafka.exactly_once: false (outcomes through one idempotent producer, no transaction)",
    )


def _config(
    tag: str, bootstrap: str, sim_url: str, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    key = BENCH_DIR / "response-cache.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("sk-bench")
    kafka: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": f"{tag}-gateway",
        "request_topic_prefix": f"{tag}.requests.",
        "response_topic_prefix": f"{tag}.responses.",
        "deadletter_topic_prefix": f"{tag}.deadletter.",
    }
    if args.response_cache_eos_tick_ms is not None:
        kafka["eos_tick_ms"] = args.response_cache_eos_tick_ms
    if args.response_cache_eos_producers is not None:
        kafka["eos_producers"] = args.response_cache_eos_producers
    if args.response_cache_at_least_once:
        kafka["exactly_once"] = False
    return {
        "kafka": kafka,
        "anthropic": {"base_url": sim_url},
        "runtime": {"log_level": "WARNING"},
        "redis": {"url": redis_url, "key_prefix": tag},
        "partners": [
            {"id": PARTNER, "api_key": {"file": str(key)}, "max_concurrency": 256, "cache": {"enabled": True}}
        ],
    }


async def _until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _count(gateway: Gateway, result: str) -> float:
    value = gateway.metrics.registry.get_sample_value(
        "gateway_response_cache_total", {"partner": PARTNER, "result": result}
    )
    return value or 0.0


def _transactions(gateway: Gateway) -> float:
    """Transactions the partition writers committed so far."""
    gateway.ingest.observe()
    return gateway.metrics.registry.get_sample_value("gateway_eos_transactions") or 0.0


def _cpu(sender: _Sender) -> dict[str, float]:
    """CPU seconds so far of the gateway (this process), the broker and the hit sender (NaN when
    not known: an external broker, the inline sender, a process gone), and the wall clock."""
    return {
        "gateway": common.cpu_quiet(os.getpid()),
        "broker": common.cpu_quiet(common.broker_pid()),
        "sender": common.cpu_quiet(sender.pid),
        "wall": time.monotonic(),
    }


def _cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Each process's CPU over a phase, in cores (None: not known): where a slow p99 came from
    (the broker's queue, on the development machine: docs/exactly-once.md)."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    cores = {k: (after[k] - before[k]) / wall for k in ("gateway", "broker", "sender")}
    return {k: None if math.isnan(v) else round(v, 3) for k, v in cores.items()}


class _Hits:
    """Every hit's exact latency (ms): the whole (what the histogram observes), the lookup, and
    the publish (from the response handed to the partition writer to its transaction committed)."""

    def __init__(self, gateway: Gateway) -> None:
        self.total: list[float] = []
        self.lookup: list[float] = []
        self.publish: list[float] = []
        child = gateway.metrics.response_cache_hit_latency.labels(PARTNER)
        observe, lookup, respond = child.observe, gateway.cache.lookup, gateway.pipeline.emit.response

        def record(seconds: float, exemplar: Any = None) -> None:
            self.total.append(seconds * 1000)
            observe(seconds, exemplar)

        async def timed_lookup(adm: Any) -> Any:
            began = time.perf_counter()
            found = await lookup(adm)
            if found is not None and found.entry is not None:
                self.lookup.append((time.perf_counter() - began) * 1000)
            return found

        async def timed_response(*args: Any, **kw: Any) -> bool:
            began = time.perf_counter()
            published = await respond(*args, **kw)
            if kw.get("attempts") == 0:
                self.publish.append((time.perf_counter() - began) * 1000)
            return published

        setattr(child, "observe", record)  # noqa: B010 - instruments this process's gateway only
        setattr(gateway.cache, "lookup", timed_lookup)  # noqa: B010
        setattr(gateway.pipeline.emit, "response", timed_response)  # noqa: B010

    def mark(self) -> tuple[int, int, int]:
        return len(self.total), len(self.lookup), len(self.publish)

    def summary(self, since: tuple[int, int, int]) -> dict[str, Any]:
        out: dict[str, Any] = {"hits": len(self.total) - since[0]}
        series = (("hit_publish_ms", self.total), ("lookup_ms", self.lookup), ("commit_ms", self.publish))
        for (name, values), start in zip(series, since, strict=True):
            v = values[start:]
            out[name] = {q: round(percentile(v, n), 2) for q, n in (("p50", 50), ("p90", 90), ("p99", 99))}
            out[name]["max"] = round(max(v), 2) if v else float("nan")
        return out


class _Sender:
    """Sends each phase's hits: `bench.hit_sender` in a process of its own, or `inline`, a
    producer in this process's event loop (which the gateway's work then shares)."""

    def __init__(
        self,
        how: str,
        producer: AIOKafkaProducer,
        topic: str,
        partitions: int,
        params: list[dict[str, Any]],
        rng: random.Random,
        arrivals: str,
    ) -> None:
        self._how, self._producer, self._topic, self._partitions = how, producer, topic, partitions
        self._params, self._rng, self._arrivals = params, rng, arrivals
        self._sent = 0
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, bootstrap: str, phases: list[tuple[float, int]]) -> None:
        if self._how != "process":
            return
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.hit_sender",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        plan = {
            "bootstrap": bootstrap, "topic": self._topic, "partitions": self._partitions,
            "params": self._params, "first": 0, "seed": self._rng.randrange(1 << 30),
            "phases": [[rate, n, self._arrivals] for rate, n in phases],
        }  # fmt: skip
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(plan).encode() + b"\n")
        await self._proc.stdin.drain()

    async def phase(self, rate: float, n: int) -> None:
        """Send the phase's `n` hits at `rate`; returns once they are all acknowledged."""
        proc = self._proc
        if proc is not None:
            assert proc.stdin is not None
            assert proc.stdout is not None
            proc.stdin.write(b"\n")  # go
            await proc.stdin.drain()
            line = await proc.stdout.readline()
            if not line.startswith(b"sent "):
                raise RuntimeError(f"bench.hit_sender stopped (exit {await proc.wait()})")
            self._sent += n
            return
        self._sent = await hit_sender.send_phase(
            self._producer, self._topic, self._partitions, self._params, self._rng,
            rate, n, self._arrivals, self._sent,
        )  # fmt: skip

    @property
    def pid(self) -> int | None:
        """The sender process's pid (None: hits are sent from this process)."""
        return None if self._proc is None else self._proc.pid

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _measure(args: argparse.Namespace, bootstrap: str, sim_url: str, redis_url: str) -> dict[str, Any]:
    tag = f"rc{uuid.uuid4().hex[:8]}"
    partitions = args.response_cache_partitions
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        kinds = ("requests", "responses", "deadletter")
        await admin.create_topics([NewTopic(f"{tag}.{k}.{PARTNER}", partitions, 1) for k in kinds])
    finally:
        await admin.close()
    host_before = common.host_loop_s()
    settings = parse_config(_config(tag, bootstrap, sim_url, redis_url, args))
    gateway = Gateway(settings, serve_http=False)
    hits = _Hits(gateway)
    rng = random.Random(args.response_cache_seed)
    params = [traffic.draw(rng)[1] for _ in range(args.response_cache_keys)]
    topic = settings.request_topic(settings.partners[0])
    stop = asyncio.Event()
    # as `claude-gateway run` does (service/cli.py): start-up objects frozen, young collections
    # rare, a full collection on a clock; the interpreter's defaults scan every object ever
    # built in each full collection (about 200 ms each in this bench)
    gc_policy.apply()
    collecting = asyncio.create_task(gc_policy.collect_periodically(stop))
    task = asyncio.create_task(gateway.run(stop))
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_request_size=2 << 20
    )
    await producer.start()
    phases: list[dict[str, Any]] = []
    arrivals = args.response_cache_arrivals
    sender = _Sender(args.response_cache_sender, producer, topic, partitions, params, rng, arrivals)
    try:
        for i, p in enumerate(params):
            rid = f"w{i}"
            await producer.send(
                topic, traffic.request_value(rid, p), key=rid.encode(), partition=i % partitions
            )
        await producer.flush()
        log(f"response_cache: {len(params)} requests sent to be stored")
        done = len(params)
        ended = ("store", "skip_stop_reason", *_NOT_STORED)
        await _until(lambda: sum(_count(gateway, r) for r in ended) >= done, 120, "stores")
        refused = {r: _count(gateway, r) for r in _NOT_STORED}
        not_stored = {r: n for r, n in refused.items() if n}
        if not_stored:  # their hits would be calls: the phases would measure something else
            raise RuntimeError(f"response_cache: answers not stored {not_stored}; see the log")
        rates = [float(r) for r in str(args.response_cache_rates).split(",")]
        plan = [(max(rates), args.response_cache_warmup_s, False)] if args.response_cache_warmup_s > 0 else []
        plan += [(rate, args.response_cache_seconds, True) for rate in rates]
        counts = [max(1, int(rate * seconds)) for rate, seconds, _ in plan]
        await sender.start(bootstrap, [(rate, n) for (rate, _, _), n in zip(plan, counts, strict=True)])
        warmup: dict[str, Any] | None = None
        for (rate, seconds, measured), n in zip(plan, counts, strict=True):
            log(f"response_cache: {n} hits at {rate:g}/s" + ("" if measured else " (warm-up)"))
            since = hits.mark()
            txns0 = _transactions(gateway)
            cpu0 = _cpu(sender)
            await sender.phase(rate, n)
            await _until(lambda: len(hits.total) >= since[0] + n, 120, "hits")  # noqa: B023
            summary = {"rate_per_s": rate, **hits.summary(since)}
            summary["hits_per_transaction"] = round(n / max(1.0, _transactions(gateway) - txns0), 2)
            summary["cpu_cores"] = _cores(cpu0, _cpu(sender))
            if measured:
                phases.append(summary)
            else:
                warmup = {"seconds": seconds, **summary}
    finally:
        await sender.stop()
        await producer.stop()
        stop.set()
        await asyncio.wait_for(task, 60)
        await collecting
    p99 = max(ph["hit_publish_ms"]["p99"] for ph in phases)
    return {
        "host_python_loop_s": {"before": host_before, "after": common.host_loop_s()},
        "keys": len(params),
        "partitions": partitions,
        "exactly_once": settings.kafka.exactly_once,
        "eos_tick_ms": settings.kafka.eos_tick_ms,
        "eos_producers": settings.kafka.eos_producers,
        "arrivals": args.response_cache_arrivals,
        "sender": args.response_cache_sender,
        "phases": phases,
        "warmup": warmup,
        "misses": _count(gateway, "miss"),
        "stored": _count(gateway, "store"),
        "not_stored_stop_reason": _count(gateway, "skip_stop_reason"),
        "hit_publish_p99_ms": p99,
        "targets": {"hit_publish_p99_ms": P99_TARGET_MS},
        "targets_met": p99 <= P99_TARGET_MS,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with (
        common.kafka() as bootstrap,
        redis_server() as redis_url,
        Simulator(SIM_ARGS, "response-cache-sim") as sim,
    ):
        return await _measure(args, bootstrap, sim.url, redis_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.response_cache", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    if args.response_cache_loop == "uvloop":
        import uvloop

        measured = uvloop.run(run(args))
    else:
        measured = asyncio.run(run(args))
    result = {"bench": "response_cache", "loop": args.response_cache_loop, **measured}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
