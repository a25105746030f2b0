"""Fifty replicas on one Redis (issue 10, docs/scaling.md): how far one hot slot goes.

50 simulated replicas (tasks in this process, each with its own Redis client, its own
`RedisLimiter` and its own HTTP client) share an org limit of 100,000 RPM through one
Redis and call the simulator, whose limit is the same. Every call goes through the real
acquisition script; answers' headers clamp the shared bucket and 429s pause it, as in the
gateway. Both the simulator's buckets and the shared one start empty, so the window
measures saturation, not the first minute's burst.

Reported: the limit's utilization and the 429 ratio over the window; the Lua acquisitions
a second Redis served (granted or not) and the Redis CPU each took (from INFO), hence the
ceiling of one Redis; and, with no upstream and no limit, the acquisitions a second this
one client process can drive.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench.common import BENCH_DIR, Simulator, log
from service.config.settings import LimitSettings, RedisSettings
from service.scheduling.limiter import Cost, Usage
from service.scheduling.pools import DEFAULT_CLASS, LimitConfig, PauseScope
from service.scheduling.redis_limiter import RedisLimiter

REPLICAS = 50
CALLS_PER_REPLICA = 6
ORG_RPM = 100_000
BODY = b'{"model":"claude-haiku-4-5","max_tokens":8,"messages":[{"role":"user","content":"Ping."}]}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free port: its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; `make bench` installs it")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def _redis_counters(url: str) -> tuple[int, float]:
    """(EVALSHA calls, Redis CPU seconds) so far."""
    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
        cpu = await client.info("cpu")
    finally:
        await client.aclose()
    calls = sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def _limiter(url: str, prefix: str, rpm: int | None) -> RedisLimiter:
    settings = RedisSettings(url=url, key_prefix=prefix, expected_replicas=REPLICAS, max_connections=8)
    return RedisLimiter(settings, LimitConfig.simple(LimitSettings(rpm=rpm)))


async def _replica(limiter: RedisLimiter, sim_url: str, stop: float, counts: dict[str, int]) -> None:
    cost = Cost(8, 8)
    async with aiohttp.ClientSession(
        headers={"x-api-key": "sk-bench-scale", "anthropic-version": "2023-06-01"},
        connector=aiohttp.TCPConnector(limit=CALLS_PER_REPLICA),
    ) as http:

        async def caller() -> None:
            while time.monotonic() < stop:
                decision = await limiter.acquire("p", cost)
                if not decision.ok:
                    await asyncio.sleep(min(decision.wait_s, 0.5))
                    continue
                async with http.post(f"{sim_url}/v1/messages", data=BODY) as resp:
                    await resp.read()
                    counts[str(resp.status)] = counts.get(str(resp.status), 0) + 1
                    if resp.status == 429:
                        limiter.settle("p", cost, Usage(0, 0))
                        retry_after = float(resp.headers.get("retry-after") or 1)
                        limiter.pause(PauseScope("org", DEFAULT_CLASS), min(retry_after, 60))
                    else:
                        limiter.settle("p", cost, Usage(8, 8))
                    limiter.observe_headers("p", cost, resp.headers)

        await asyncio.gather(*(caller() for _ in range(CALLS_PER_REPLICA)))


async def _acquire_only(url: str, seconds: float) -> float:
    """Acquisitions a second 50 replicas drive with no upstream and no limit (client-bound)."""
    prefix = f"ceiling-{uuid.uuid4().hex[:6]}"
    limiters = [_limiter(url, prefix, 10**12) for _ in range(REPLICAS)]
    stop = time.monotonic() + seconds
    done = 0

    async def loop(limiter: RedisLimiter) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await limiter.acquire("p", Cost(1, 1))
            done += 1

    try:
        await asyncio.gather(*(loop(lim) for lim in limiters for _ in range(CALLS_PER_REPLICA)))
    finally:
        for lim in limiters:
            await lim.aclose()
    return done / seconds


WORKERS = 2
"""Processes the replicas run in (as replicas would), so one Python process is not the limit."""


async def _worker(redis_url: str, sim_url: str, prefix: str, replicas: int, seconds: float) -> dict[str, int]:
    limiters = [_limiter(redis_url, prefix, ORG_RPM) for _ in range(replicas)]
    counts: dict[str, int] = {}
    stop = time.monotonic() + seconds
    try:
        await asyncio.gather(*(_replica(lim, sim_url, stop, counts) for lim in limiters))
    finally:
        for lim in limiters:
            await lim.aclose()
    return counts


def _spawn_workers(
    redis_url: str, sim_url: str, prefix: str, seconds: float
) -> list[subprocess.Popen[bytes]]:
    per = REPLICAS // WORKERS
    cmd = [sys.executable, "-m", "bench.limits_scale", redis_url, sim_url, prefix, str(per), str(seconds)]
    return [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=(BENCH_DIR / f"scale-worker-{i}.log").open("wb"))
        for i in range(WORKERS)
    ]


async def fifty_replicas(window_s: float) -> dict[str, Any]:
    log(f"limits: {REPLICAS} replicas in {WORKERS} processes on one Redis, org {ORG_RPM:,} RPM")
    sim_args = [
        "--rpm",
        str(ORG_RPM),
        "--itpm",
        "0",
        "--otpm",
        "0",
        "--latency-s",
        "0.02",
        "--output-tokens",
        "8",
    ]
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    with redis_server() as url, Simulator(sim_args, name="limits-scale-simulator") as sim:
        prefix = f"scale-{uuid.uuid4().hex[:6]}"
        client = aioredis.Redis.from_url(url)
        # both buckets start empty: the window measures saturation, not a minute's burst
        now = await client.time()
        await client.hset(
            f"{{{prefix}}}:bucket:org:rpm", mapping={"level": "0", "ts": f"{now[0]}.{now[1]:06d}"}
        )
        await client.aclose()
        async with aiohttp.ClientSession() as http, http.post(f"{sim.url}/_sim/reset?buckets=empty") as r:
            r.raise_for_status()
        warmup = 5.0
        workers = _spawn_workers(url, sim.url, prefix, warmup + window_s)
        try:
            await asyncio.sleep(warmup)
            s0, (e0, cpu0), t0 = sim.stats(), await _redis_counters(url), time.monotonic()
            await asyncio.sleep(window_s)
            s1, (e1, cpu1), elapsed = sim.stats(), await _redis_counters(url), time.monotonic() - t0
        finally:
            for w in workers:
                w.wait(60)
        ceiling_client = await _acquire_only(url, 10.0)
    ok = s1["status_counts"].get("200", 0) - s0["status_counts"].get("200", 0)
    calls = s1["calls_total"] - s0["calls_total"]
    n429 = s1["rate_limited_429"] - s0["rate_limited_429"]
    scripts_per_s = (e1 - e0) / elapsed
    cpu_us = (cpu1 - cpu0) / max(1, e1 - e0) * 1e6
    log(
        f"limits:   ok={ok} calls={calls} 429={n429} scripts/s={scripts_per_s:.0f} "
        f"redis cpu/script={cpu_us:.1f}us"
    )
    return {
        "redis_50_replicas_utilization": round(ok / elapsed / (ORG_RPM / 60), 4),
        "redis_50_replicas_429_ratio": round(n429 / calls, 5) if calls else 0.0,
        "redis_50_lua_scripts_per_s": round(scripts_per_s),
        "redis_50_redis_cpu_us_per_script": round(cpu_us, 1),
        "redis_one_instance_ceiling_scripts_per_s": round(1e6 / cpu_us) if cpu_us > 0 else None,
        "redis_50_client_bound_acquisitions_per_s": round(ceiling_client),
    }


if __name__ == "__main__":  # a worker process: python -m bench.limits_scale REDIS SIM PREFIX N SECONDS
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    redis_url_, sim_url_, prefix_, n_, seconds_ = sys.argv[1:6]
    out = asyncio.run(_worker(redis_url_, sim_url_, prefix_, int(n_), float(seconds_)))
    print(orjson.dumps(out).decode(), flush=True)
