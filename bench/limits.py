"""The limits benchmark: fair sharing of one org's Claude limits, on one replica and three.

Scenarios, each against the simulator with its limits set to the configured org
limits (RPM binding: 6,000/min, i.e. 100 requests/s), after a warm-up that drains
the buckets' initial burst, measured over a window of saturation (60 s by default):

- equal: three saturating partners, equal weights -> utilization, 429 ratio, Jain's index
- weighted: weights 1:2:3 -> worst share error in percentage points
- work_conserving: one of three equal partners saturating, two idle -> utilization
- redis: three gateway processes sharing limits through Redis -> utilization, 429 ratio
- backlog: one partner with a 1,000,000-message backlog, a quiet partner at 1 req/s ->
  the quiet partner's p99 queue wait, and the gateway's RSS growth
- mixed, per_model, key_429 (bench/limits_mixed.py): request sizes that differ by orders of
  magnitude, limits per model class, a 429 on one workspace
- redis50 (bench/limits_scale.py): 50 replicas sharing one org limit through one Redis

The equal, work_conserving and backlog scenarios also run through a naive limiter
(bench/run_gateway.py: per-partner static buckets, blind to headers and 429s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import psutil
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import limits_mixed, limits_scale
from bench.common import BENCH_DIR, MODEL, Simulator, create_topics, kafka, log, spawn, tag, tail, terminate

ORG_RPM = 6_000
ORG_TOKENS = 50_000_000  # ITPM/OTPM far from binding: RPM is the binding limit
RATE = ORG_RPM / 60
PARTITIONS = 3
KEYS = {p: f"sk-bench-{p}-0123456789" for p in ("p1", "p2", "p3", "flood", "quiet")}
SCENARIOS = (
    "equal",
    "weighted",
    "work_conserving",
    "redis",
    "backlog",
    "mixed",
    "per_model",
    "key_429",
    "redis50",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limits-window-s", type=float, default=float(os.environ.get("BENCH_LIMITS_WINDOW_S", 60))
    )
    parser.add_argument(
        "--limits-scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--limits-backlog", type=int, default=int(os.environ.get("BENCH_LIMITS_BACKLOG", 1_000_000))
    )


def _key_label(key: str) -> str:
    return f"key-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _post(url: str, body: Mapping[str, Any] | None = None) -> None:
    req = urllib.request.Request(url, data=orjson.dumps(body or {}), method="POST")
    req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=5):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- traffic


def _value(rid: str) -> bytes:
    return orjson.dumps(
        {
            "request_id": rid,
            "params": {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "Ping."}]},
        }
    )


async def _produce(bootstrap: str, topic: str, n: int, prefix: str) -> None:
    """Produce `n` requests fast, in batches spread over the partitions."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=50, max_batch_size=1 << 20)
    await producer.start()
    try:
        pending = []
        i = 0
        while i < n:
            for partition in range(PARTITIONS):
                batch = producer.create_batch()
                while i < n:
                    rid = f"{prefix}-{i}"
                    if batch.append(key=rid.encode(), value=_value(rid), timestamp=None) is None:
                        break
                    i += 1
                batch.close()
                pending.append(await producer.send_batch(batch, topic, partition=partition))
                if len(pending) > 64:
                    await asyncio.gather(*pending)
                    pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


class Ends:
    """Messages on topics, from their end offsets."""

    def __init__(self, bootstrap: str) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)

    async def __aenter__(self) -> Ends:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def count(self, topic: str) -> int:
        tps = [TopicPartition(topic, i) for i in range(PARTITIONS)]
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(tps)
        return sum(ends.values())


# --------------------------------------------------------------------------- gateways


class World:
    def __init__(self, bootstrap: str, sim: Simulator, name: str, partners: Mapping[str, float]) -> None:
        self.bootstrap = bootstrap
        self.sim = sim
        self.tag = tag(name)
        self.partners = dict(partners)

    def topic(self, kind: str, partner: str) -> str:
        return f"{self.tag}.{kind}.{partner}"

    async def create(self) -> None:
        await create_topics(
            self.bootstrap,
            [self.topic(k, p) for p in self.partners for k in ("requests", "responses", "deadletter")],
            PARTITIONS,
        )

    def config(self, group: str, redis_url: str | None = None) -> Path:
        keys_dir = BENCH_DIR / "keys"
        keys_dir.mkdir(parents=True, exist_ok=True)
        partners = []
        for p, w in self.partners.items():
            (keys_dir / p).write_text(KEYS[p])
            partners.append(
                {
                    "id": p,
                    "weight": w,
                    "max_concurrency": 64,
                    "max_queue": 1000,
                    "api_key": {"file": str(keys_dir / p)},
                }
            )
        cfg: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "group_id": group,
                "request_topic_prefix": f"{self.tag}.requests.",
                "response_topic_prefix": f"{self.tag}.responses.",
                "deadletter_topic_prefix": f"{self.tag}.deadletter.",
            },
            "anthropic": {"base_url": self.sim.url, "timeout_s": 30},
            "runtime": {
                "http_port": 0,
                "http_host": "127.0.0.1",
                "drain_timeout_s": 5,
                "log_level": "WARNING",
            },
            "org_limits": {"rpm": ORG_RPM, "itpm": ORG_TOKENS, "otpm": ORG_TOKENS},
            "partners": partners,
        }
        if redis_url is not None:
            cfg["limiter_backend"] = "redis"
            cfg["redis"] = {"url": redis_url, "key_prefix": group, "expected_replicas": 3}
        path = BENCH_DIR / f"{group}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start(self, group: str, naive: bool = False, redis_url: str | None = None) -> subprocess.Popen[bytes]:
        path = self.config(group, redis_url)
        cmd = (
            [sys.executable, "-m", "bench.run_gateway", "--config", str(path)]
            if naive
            else [sys.executable, "-m", "service", "run", "--config", str(path)]
        )
        if naive:
            cmd.append("--naive")
        return spawn(cmd, BENCH_DIR / f"{group}.log")


MAX_WARMUP_S = 120.0


async def _drained(sim: Simulator) -> None:
    """Wait until the upstream's RPM bucket has spent its initial burst (saturation), or
    stops falling (a limiter that cannot saturate it: measure what it reaches)."""
    began = time.monotonic()
    history: list[float] = []
    while time.monotonic() - began < MAX_WARMUP_S:
        bucket = sim.stats()["buckets"]["default"]["requests"]
        level, limit = float(bucket["level"]), float(bucket["limit"])
        history.append(level)
        if level < 0.02 * limit:
            break
        if len(history) > 10 and history[-11] - level < 0.01 * limit:
            log("limits:   the upstream bucket stopped draining: not saturating")
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)
    log(f"limits:   measuring after {time.monotonic() - began:.0f}s of warm-up")


def _jain(xs: Sequence[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


async def _saturate(
    world: World,
    saturating: Sequence[str],
    window_s: float,
    *,
    naive: bool = False,
    replicas: int = 1,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """Backlog the saturating partners, warm up, and measure one window."""
    per_partner = math.ceil(ORG_RPM + RATE * (MAX_WARMUP_S + window_s) * 1.3)
    await asyncio.gather(
        *[
            _produce(world.bootstrap, world.topic("requests", p), per_partner, f"{p}-{'n' if naive else 'o'}")
            for p in saturating
        ]
    )
    _post(f"{world.sim.url}/_sim/reset")
    group = f"{world.tag}-{'naive' if naive else 'gw'}"
    procs = [world.start(group, naive=naive, redis_url=redis_url) for _ in range(replicas)]
    try:
        async with Ends(world.bootstrap) as ends:
            await _drained(world.sim)
            s0 = world.sim.stats()
            r0 = {p: await ends.count(world.topic("responses", p)) for p in world.partners}
            t0 = time.monotonic()
            await asyncio.sleep(window_s)
            s1 = world.sim.stats()
            r1 = {p: await ends.count(world.topic("responses", p)) for p in world.partners}
            elapsed = time.monotonic() - t0
    finally:
        codes = [terminate(p, 30) for p in procs]
    if any(c != 0 for c in codes):
        raise RuntimeError(f"a gateway exited with {codes}:\n{tail(BENCH_DIR / f'{group}.log')}")
    calls = s1["calls_total"] - s0["calls_total"]
    ok = s1["status_counts"].get("200", 0) - s0["status_counts"].get("200", 0)
    n429 = s1["rate_limited_429"] - s0["rate_limited_429"]
    served = {p: r1[p] - r0[p] for p in world.partners}
    log(f"limits:   ok={ok} calls={calls} 429={n429} served={served} in {elapsed:.1f}s")
    return {
        "utilization": round(ok / elapsed / RATE, 4),
        "upstream_429_ratio": round(n429 / calls, 5) if calls else 0.0,
        "served": served,
        "calls": calls,
        "window_s": round(elapsed, 1),
    }


class _PeakRss:
    """The peak RSS of a process, sampled every 0.1 s from its start."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = 0
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            while True:
                self.peak = max(self.peak, self._process.memory_info().rss)
                await asyncio.sleep(0.1)

    def stop(self) -> int:
        self._task.cancel()
        return self.peak


async def _idle_rss(world: World, *, naive: bool) -> int:
    """Peak RSS of the same gateway on empty topics: what the backlog is measured against."""
    group = f"{world.tag}-idle-{'naive' if naive else 'gw'}"
    proc = world.start(group, naive=naive)
    rss = _PeakRss(proc.pid)
    try:
        await asyncio.sleep(12)  # started, joined, assigned, idle
    finally:
        peak = rss.stop()
        terminate(proc, 30)
    return peak


async def _backlog(
    world: World, backlog: int, quiet_s: float, *, naive: bool, idle_rss: int
) -> dict[str, Any]:
    """Flood partner with a huge backlog (already produced), quiet partner at 1 req/s."""
    _post(f"{world.sim.url}/_sim/reset")
    group = f"{world.tag}-{'naive' if naive else 'gw'}"
    proc = world.start(group, naive=naive)
    rss = _PeakRss(proc.pid)
    quiet_topic = world.topic("requests", "quiet")
    producer = AIOKafkaProducer(bootstrap_servers=world.bootstrap, linger_ms=0)
    await producer.start()
    ids: list[str] = []
    try:
        await _drained(world.sim)
        began = time.monotonic()
        i = 0
        while time.monotonic() - began < quiet_s:
            rid = f"quiet-{'n' if naive else 'o'}-{i}"
            ids.append(rid)
            await producer.send_and_wait(quiet_topic, _value(rid), key=rid.encode())
            i += 1
            await asyncio.sleep(1.0)
        await asyncio.sleep(3)
    finally:
        await producer.stop()
        peak = rss.stop()
        code = terminate(proc, 30)
    if code != 0:
        raise RuntimeError(f"the gateway exited with {code}:\n{tail(BENCH_DIR / f'{group}.log')}")
    waits = await _queue_waits(world, set(ids))
    waits.sort()
    p99 = waits[min(len(waits) - 1, math.ceil(0.99 * len(waits)) - 1)] if waits else float("nan")
    return {
        "quiet_partner_p99_wait_ms": round(p99, 2),
        "quiet_partner_p50_wait_ms": round(statistics.median(waits), 2) if waits else float("nan"),
        "quiet_answered": f"{len(waits)}/{len(ids)}",
        "backlog_rss_growth_mb": round((peak - idle_rss) / 2**20, 1),
        "backlog_rss_peak_mb": round(peak / 2**20, 1),
        "idle_rss_peak_mb": round(idle_rss / 2**20, 1),
        "backlog": backlog,
    }


async def _queue_waits(world: World, ids: set[str]) -> list[float]:
    consumer = AIOKafkaConsumer(bootstrap_servers=world.bootstrap, enable_auto_commit=False)
    await consumer.start()
    waits: list[float] = []
    try:
        tps = [TopicPartition(world.topic("responses", "quiet"), i) for i in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while any(pos < ends[tp] for tp, pos in [(tp, await consumer.position(tp)) for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    doc = orjson.loads(r.value)
                    if doc["request_id"] in ids:
                        waits.append(float(doc["timings"]["queue_ms"]))
    finally:
        await consumer.stop()
    return waits


# --------------------------------------------------------------------------- the run


async def run(args: argparse.Namespace) -> dict[str, Any]:
    window = float(args.limits_window_s)
    backlog = int(args.limits_backlog)
    scenarios = set(str(args.limits_scenarios).split(","))
    sim_args = [
        "--rpm",
        str(ORG_RPM),
        "--itpm",
        str(ORG_TOKENS),
        "--otpm",
        str(ORG_TOKENS),
        "--latency-s",
        "0.05",
        "--output-tokens",
        "16",
        "--seed",
        "1",
    ]
    for name, key in KEYS.items():
        sim_args += ["--api-key", f"{name}={key}"]
    result: dict[str, Any] = {"bench": "limits", "org_rpm": ORG_RPM, "window_s": window}
    naive: dict[str, Any] = {}
    with kafka() if scenarios - {"redis50"} else contextlib.nullcontext("") as bootstrap:
        if scenarios & {"equal", "weighted", "work_conserving", "redis", "backlog"}:
            with Simulator(sim_args, name="limits-simulator") as sim:
                if "equal" in scenarios:
                    await _equal(bootstrap, sim, window, result, naive)
                if "weighted" in scenarios:
                    await _weighted(bootstrap, sim, window, result)
                if "work_conserving" in scenarios:
                    await _work_conserving(bootstrap, sim, window, result, naive)
                if "redis" in scenarios:
                    await _replicas(bootstrap, sim, window, result)
                if "backlog" in scenarios:
                    await _quiet_behind_backlog(bootstrap, sim, window, backlog, result, naive)
        # each with its own simulator (bench/limits_mixed.py)
        if "mixed" in scenarios:
            await limits_mixed.mixed(bootstrap, window, result, naive)
        if "per_model" in scenarios:
            await limits_mixed.per_model(bootstrap, window, result)
        if "key_429" in scenarios:
            await limits_mixed.key_429(bootstrap, window, result)
    if "redis50" in scenarios:
        result.update(await limits_scale.fifty_replicas(window))
    result["naive"] = naive
    checks: dict[str, Callable[[float], bool]] = {
        "utilization": lambda v: v >= 0.98,
        "upstream_429_ratio": lambda v: v <= 0.005,
        "jain_equal": lambda v: v >= 0.99,
        "weighted_share_max_error_pp": lambda v: v <= 3,
        "quiet_partner_p99_wait_ms": lambda v: v <= 100,
        "redis_replicas_utilization": lambda v: v >= 0.95,
        "redis_replicas_429_ratio": lambda v: v <= 0.01,
        "work_conserving_utilization": lambda v: v >= 0.98,
        "backlog_rss_growth_mb": lambda v: v <= 100,
        "mixed_jain_binding": lambda v: v >= 0.99,
        "mixed_order_independent_pp": lambda v: v <= 1.0,
        "mixed_weighted_share_max_error_pp": lambda v: v <= 3,
        "mixed_utilization": lambda v: v >= 0.97,
        "mixed_upstream_429_ratio": lambda v: v <= 0.005,
        "per_model_isolation": lambda v: v >= 0.97,
        "key_429_isolation": lambda v: v >= 0.97,
        "redis_50_replicas_utilization": lambda v: v >= 0.95,
        "redis_50_replicas_429_ratio": lambda v: v <= 0.01,
    }
    result["targets_met"] = {k: check(result[k]) for k, check in checks.items() if k in result}
    return result


async def _equal(
    bootstrap: str, sim: Simulator, window: float, result: dict[str, Any], naive: dict[str, Any]
) -> None:
    equal = World(bootstrap, sim, "equal", {"p1": 1, "p2": 1, "p3": 1})
    await equal.create()
    for label, is_naive in (("ours", False), ("naive", True)):
        log(f"limits: equal weights, {label}")
        m = await _saturate(equal, ["p1", "p2", "p3"], window, naive=is_naive)
        out = result if not is_naive else naive
        out["utilization"] = m["utilization"]
        out["upstream_429_ratio"] = m["upstream_429_ratio"]
        out["jain_equal"] = round(_jain(list(m["served"].values())), 4)


async def _weighted(bootstrap: str, sim: Simulator, window: float, result: dict[str, Any]) -> None:
    log("limits: weights 1:2:3")
    weighted = World(bootstrap, sim, "weighted", {"p1": 1, "p2": 2, "p3": 3})
    await weighted.create()
    m = await _saturate(weighted, ["p1", "p2", "p3"], window)
    total = sum(m["served"].values()) or 1
    weights = sum(weighted.partners.values())
    result["weighted_share_max_error_pp"] = round(
        max(abs(m["served"][p] / total - w / weights) * 100 for p, w in weighted.partners.items()), 2
    )
    result["weighted_served"] = m["served"]


async def _work_conserving(
    bootstrap: str, sim: Simulator, window: float, result: dict[str, Any], naive: dict[str, Any]
) -> None:
    wc = World(bootstrap, sim, "wc", {"p1": 1, "p2": 1, "p3": 1})
    await wc.create()
    for label, is_naive in (("ours", False), ("naive", True)):
        log(f"limits: work conservation, {label}")
        m = await _saturate(wc, ["p1"], window, naive=is_naive)
        (result if not is_naive else naive)["work_conserving_utilization"] = m["utilization"]


async def _replicas(bootstrap: str, sim: Simulator, window: float, result: dict[str, Any]) -> None:
    log("limits: three replicas through Redis")
    with limits_scale.redis_server() as redis_url:
        rw = World(bootstrap, sim, "redis", {"p1": 1, "p2": 1, "p3": 1})
        await rw.create()
        m = await _saturate(rw, ["p1", "p2", "p3"], window, replicas=3, redis_url=redis_url)
        result["redis_replicas_utilization"] = m["utilization"]
        result["redis_replicas_429_ratio"] = m["upstream_429_ratio"]


async def _quiet_behind_backlog(
    bootstrap: str, sim: Simulator, window: float, backlog: int, result: dict[str, Any], naive: dict[str, Any]
) -> None:
    bw = World(bootstrap, sim, "backlog", {"flood": 1, "quiet": 1})
    await bw.create()
    log(f"limits: producing a {backlog:,}-message backlog")
    began = time.monotonic()
    await _produce(bootstrap, bw.topic("requests", "flood"), backlog, "flood")
    log(f"limits: backlog produced in {time.monotonic() - began:.0f}s")
    idle = World(bootstrap, sim, "idle", {"flood": 1, "quiet": 1})
    await idle.create()
    for label, is_naive in (("ours", False), ("naive", True)):
        log(f"limits: quiet partner behind a backlog, {label}")
        idle_rss = await _idle_rss(idle, naive=is_naive)
        m = await _backlog(bw, backlog, min(30.0, window), naive=is_naive, idle_rss=idle_rss)
        out = result if not is_naive else naive
        out.update({k: v for k, v in m.items() if k != "backlog"})
    result["backlog"] = backlog
