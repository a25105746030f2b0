"""Limits bench scenarios for real workloads (issue 10): mixed request sizes, model classes,
and a 429 on one workspace. Each runs the gateway against the simulator, with the
simulator's limits equal to the configured ones, after a warm-up that spends the buckets'
initial burst, over one window; shares and utilization come from what the simulator
billed each partner's key (`billed_by_key`).

- mixed: three equal-weight partners at `max_tokens` 8192 / 1024 / 256 with prompts of
  20k / 2k / 200 tokens, OTPM binding at 400k (outputs run to `max_tokens`; windows four
  times the base window, so one large request is 0.5% of a share): Jain's index of the
  output-token shares, the same with the config order reversed, weights 1:2:3, OTPM
  utilization, 429 ratio; and the same mix through the naive limiter.
- per_model: a Haiku partner and an Opus partner, each saturating its own class pool:
  each one's utilization of its class limit.
- key_429: one partner's key sits in a workspace whose limit answers 429 with
  `retry-after: 30`; the two others saturate the org: their utilization of what remains.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaProducer

from bench.common import BENCH_DIR, Simulator, create_topics, log, spawn, tag, tail, terminate

PARTITIONS = 3
LATENCY_S = 0.05
MAX_WARMUP_S = 120.0
MIN_RUNNING_S = 5.0
DIMS = {"requests": 0, "input_tokens": 1, "output_tokens": 2}


@dataclass(frozen=True)
class Partner:
    id: str
    max_tokens: int
    prompt_tokens: int
    model: str = "claude-sonnet-4-5"
    weight: float = 1.0

    @property
    def key(self) -> str:
        return f"sk-bench-{self.id}-0123456789"


MIX = (
    Partner("large", 8192, 20_000),
    Partner("medium", 1024, 2_000),
    Partner("small", 256, 200),
)
MIX_OTPM = 400_000
"""Low enough that the largest request (8,192 tokens) is more than a second of the budget (the
fair-share cap that made large requests cheap before), high enough that it is 0.5% of what a
window of `MIX_WINDOW_FACTOR` x the base window measures (shares exact to about a point)."""
MIX_LIMITS = {"rpm": 10_000, "itpm": 40_000_000, "otpm": MIX_OTPM}
MIX_WINDOW_FACTOR = 4


def _value(rid: str, p: Partner) -> bytes:
    prompt = ("lorem ipsum " * (p.prompt_tokens // 3 + 1))[: p.prompt_tokens * 4]  # ~4 chars a token
    params = {"model": p.model, "max_tokens": p.max_tokens, "messages": [{"role": "user", "content": prompt}]}
    return orjson.dumps({"request_id": rid, "params": params})


async def _produce(bootstrap: str, topic: str, p: Partner, n: int, prefix: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=50, max_request_size=8 << 20)
    await producer.start()
    try:
        pending = []
        for i in range(n):
            rid = f"{prefix}-{i}"
            pending.append(
                await producer.send(topic, _value(rid, p), key=rid.encode(), partition=i % PARTITIONS)
            )
            if len(pending) >= 512:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def _post(url: str, body: Mapping[str, Any] | None = None) -> None:
    req = urllib.request.Request(url, data=orjson.dumps(body or {}), method="POST")
    req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=5):
        pass


def simulator(name: str, limits: Mapping[str, Any], **extra: Any) -> Simulator:
    """A simulator whose outputs run to `max_tokens`, with every bench key accepted."""
    keys = {
        p: f"sk-bench-{p}-0123456789" for p in ("large", "medium", "small", "haiku", "opus", "ws", "x", "y")
    }
    cfg = {
        "api_keys": keys,
        "limits": dict(limits),
        "latency": {"distribution": "fixed", "fixed_s": LATENCY_S},
        "output": {"distribution": "fixed", "fixed_tokens": 100_000},
        "seed": 1,
        **extra,
    }
    path = BENCH_DIR / f"{name}.yaml"
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return Simulator(["--config", str(path)], name=name)


@dataclass
class Run:
    billed: dict[str, tuple[int, int, int]]
    """Per partner: requests, input tokens, output tokens billed over the window."""
    calls: int
    n429: int
    window_s: float

    def shares(self, dim: str) -> dict[str, float]:
        total = sum(b[DIMS[dim]] for b in self.billed.values()) or 1
        return {p: b[DIMS[dim]] / total for p, b in self.billed.items()}

    def billed_total(self, dim: str) -> int:
        return sum(b[DIMS[dim]] for b in self.billed.values())

    def per_minute(self, partner: str, dim: str) -> float:
        return self.billed.get(partner, (0, 0, 0))[DIMS[dim]] / self.window_s * 60


def _gateway_config(
    world: str, bootstrap: str, sim: Simulator, partners: Sequence[Partner], group: str, **extra: Any
) -> str:
    keys_dir = BENCH_DIR / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for p in partners:
        (keys_dir / p.id).write_text(p.key)
        entries.append(
            {
                "id": p.id,
                "weight": p.weight,
                "max_concurrency": 64,
                "max_queue": 1000,
                "api_key": {"file": str(keys_dir / p.id)},
                **({"workspace": "small"} if p.id == "ws" else {}),
            }
        )
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": group,
            "request_topic_prefix": f"{world}.requests.",
            "response_topic_prefix": f"{world}.responses.",
            "deadletter_topic_prefix": f"{world}.deadletter.",
        },
        "anthropic": {"base_url": sim.url, "timeout_s": 30},
        "runtime": {"http_port": 0, "http_host": "127.0.0.1", "drain_timeout_s": 5, "log_level": "WARNING"},
        "partners": entries,
        **extra,
    }
    path = BENCH_DIR / f"{group}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


async def _drained(sim: Simulator, buckets: Sequence[tuple[str, str]]) -> None:
    """Until the gateway has called for `MIN_RUNNING_S` and every named bucket (set, dimension)
    has spent its initial burst, or stops falling once it started to."""
    began = time.monotonic()
    first_call: float | None = None
    history: list[float] = []
    while time.monotonic() - began < MAX_WARMUP_S:
        stats = sim.stats()
        if first_call is None and stats["calls_total"] > 0:
            first_call = time.monotonic()
        snap = stats["buckets"]
        fractions = [float(snap[s][d]["level"]) / float(snap[s][d]["limit"]) for s, d in buckets]
        history.append(max(fractions))
        running = first_call is not None and time.monotonic() - first_call >= MIN_RUNNING_S
        if running and history[-1] < 0.02:
            break
        started = history[0] - history[-1] >= 0.02  # a gateway takes seconds to start
        if running and started and len(history) > 20 and history[-21] - history[-1] < 0.01:
            log("limits:   a bucket stopped draining: not saturating")
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)
    log(f"limits:   measuring after {time.monotonic() - began:.0f}s of warm-up")


async def saturate(
    bootstrap: str,
    sim: Simulator,
    name: str,
    partners: Sequence[Partner],
    window_s: float,
    per_minute: Mapping[str, float],
    buckets: Sequence[tuple[str, str]],
    *,
    naive: bool = False,
    empty: bool = False,
    **gateway: Any,
) -> Run:
    """Backlog every partner (`per_minute`: its expected requests a minute), run one gateway,
    warm up, and measure one window. `empty`: the simulator's buckets start empty (a burst
    would take minutes to spend: the measured window must not include it)."""
    world = tag(name)
    await create_topics(
        bootstrap, [f"{world}.{k}.{p.id}" for p in partners for k in ("requests", "responses", "deadletter")]
    )
    minutes = (MAX_WARMUP_S + window_s) / 60 * 1.5
    await asyncio.gather(
        *[
            _produce(
                bootstrap, f"{world}.requests.{p.id}", p, math.ceil(per_minute[p.id] * minutes) + 200, p.id
            )
            for p in partners
        ]
    )
    _post(f"{sim.url}/_sim/reset" + ("?buckets=empty" if empty else ""))
    group = f"{world}-{'naive' if naive else 'gw'}"
    path = _gateway_config(world, bootstrap, sim, partners, group, **gateway)
    cmd = [sys.executable, "-m", "bench.run_gateway", "--config", path, *(["--naive"] if naive else [])]
    proc: subprocess.Popen[bytes] = spawn(cmd, BENCH_DIR / f"{group}.log")
    try:
        await _drained(sim, buckets)
        s0 = sim.stats()
        t0 = time.monotonic()
        await asyncio.sleep(window_s)
        s1 = sim.stats()
        elapsed = time.monotonic() - t0
    finally:
        code = terminate(proc, 30)
    if code != 0:
        raise RuntimeError(f"the gateway exited with {code}:\n{tail(BENCH_DIR / f'{group}.log')}")
    billed = {}
    for p in partners:
        name_ = p.key.removeprefix("sk-bench-").removesuffix("-0123456789")
        b0 = s0["billed_by_key"].get(name_, {"requests": 0, "input_tokens": 0, "output_tokens": 0})
        b1 = s1["billed_by_key"].get(name_, {"requests": 0, "input_tokens": 0, "output_tokens": 0})
        billed[p.id] = (
            b1["requests"] - b0["requests"],
            b1["input_tokens"] - b0["input_tokens"],
            b1["output_tokens"] - b0["output_tokens"],
        )
    run = Run(
        billed,
        s1["calls_total"] - s0["calls_total"],
        s1["rate_limited_429"] - s0["rate_limited_429"],
        elapsed,
    )
    log(f"limits:   {name}: billed={billed} calls={run.calls} 429={run.n429} in {elapsed:.1f}s")
    return run


def jain(xs: Sequence[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


def _mix_rates(partners: Sequence[Partner]) -> dict[str, float]:
    """Expected requests a minute of each partner at its weighted share of the OTPM."""
    total = sum(p.weight for p in partners)
    return {p.id: MIX_OTPM * p.weight / total / p.max_tokens for p in partners}


async def mixed(bootstrap: str, base_window_s: float, result: dict[str, Any], naive: dict[str, Any]) -> None:
    window_s = MIX_WINDOW_FACTOR * base_window_s
    result["mixed_window_s"] = window_s
    gateway: dict[str, Any] = {"org_limits": MIX_LIMITS}
    with simulator("limits-mixed-simulator", MIX_LIMITS) as sim:
        otpm = [("default", "output_tokens")]
        log("limits: mixed sizes, equal weights")
        first = await saturate(bootstrap, sim, "mixed", MIX, window_s, _mix_rates(MIX), otpm, **gateway)
        shares = first.shares("output_tokens")
        result["mixed_shares"] = {p: round(s, 4) for p, s in shares.items()}
        result["mixed_jain_binding"] = round(jain(list(shares.values())), 4)
        result["mixed_utilization"] = round(
            first.billed_total("output_tokens") / (MIX_OTPM / 60 * first.window_s), 4
        )
        result["mixed_upstream_429_ratio"] = round(first.n429 / first.calls, 5) if first.calls else 0.0
        log("limits: mixed sizes, config order reversed")
        rev = await saturate(
            bootstrap, sim, "mixed-rev", MIX[::-1], window_s, _mix_rates(MIX), otpm, **gateway
        )
        rshares = rev.shares("output_tokens")
        result["mixed_shares_reversed"] = {p: round(s, 4) for p, s in rshares.items()}
        result["mixed_order_independent_pp"] = round(
            max(abs(shares[p] - rshares[p]) * 100 for p in shares), 2
        )
        result["mixed_order_independent"] = result["mixed_order_independent_pp"] <= 1.0
        log("limits: mixed sizes, weights 1:2:3")
        weighted = tuple(
            Partner(p.id, p.max_tokens, p.prompt_tokens, weight=w)
            for p, w in zip(MIX, (1, 2, 3), strict=True)
        )
        wrun = await saturate(
            bootstrap, sim, "mixed-w", weighted, window_s, _mix_rates(weighted), otpm, **gateway
        )
        wshares = wrun.shares("output_tokens")
        result["mixed_weighted_shares"] = {p: round(s, 4) for p, s in wshares.items()}
        result["mixed_weighted_share_max_error_pp"] = round(
            max(abs(wshares[p.id] - p.weight / 6) * 100 for p in weighted), 2
        )
        log("limits: mixed sizes, naive limiter")
        nrun = await saturate(
            bootstrap, sim, "mixed-naive", MIX, window_s, _mix_rates(MIX), otpm, naive=True, **gateway
        )
        nshares = nrun.shares("output_tokens")
        naive["mixed_shares"] = {p: round(s, 4) for p, s in nshares.items()}
        naive["mixed_jain_binding"] = round(jain(list(nshares.values())), 4)
        naive["mixed_utilization"] = round(
            nrun.billed_total("output_tokens") / (MIX_OTPM / 60 * nrun.window_s), 4
        )
        naive["mixed_upstream_429_ratio"] = round(nrun.n429 / nrun.calls, 5) if nrun.calls else 0.0


CLASS_LIMITS = {
    "haiku": {"rpm": 3_000, "itpm": 20_000_000, "otpm": 20_000_000},
    "opus": {"rpm": 600, "itpm": 20_000_000, "otpm": 20_000_000},
}


async def per_model(bootstrap: str, window_s: float, result: dict[str, Any]) -> None:
    log("limits: a Haiku and an Opus partner, each saturating its class")
    partners = (
        Partner("haiku", 16, 20, model="claude-haiku-4-5"),
        Partner("opus", 16, 20, model="claude-opus-4-1"),
    )
    default = {"rpm": 6_000, "itpm": 20_000_000, "otpm": 20_000_000}
    with simulator("limits-classes-simulator", default, model_limits=CLASS_LIMITS) as sim:
        run = await saturate(
            bootstrap,
            sim,
            "classes",
            partners,
            window_s,
            {"haiku": 3_000, "opus": 600},
            [("haiku", "requests"), ("opus", "requests")],
            empty=True,
            org_limits=default,
            org_class_limits=CLASS_LIMITS,
        )
    haiku = run.per_minute("haiku", "requests") / CLASS_LIMITS["haiku"]["rpm"]
    opus = run.per_minute("opus", "requests") / CLASS_LIMITS["opus"]["rpm"]
    result["per_model_utilization"] = {"haiku": round(haiku, 4), "opus": round(opus, 4)}
    result["per_model_isolation"] = round(min(haiku, opus), 4)
    result["per_model_upstream_429_ratio"] = round(run.n429 / run.calls, 5) if run.calls else 0.0


async def key_429(bootstrap: str, window_s: float, result: dict[str, Any]) -> None:
    log("limits: one partner's workspace answers 429 with retry-after 30")
    org = {"rpm": 6_000, "itpm": 20_000_000, "otpm": 20_000_000}
    workspaces = {"small": {"keys": ["ws"], "limits": {"rpm": 2}}}
    partners = (Partner("ws", 16, 20), Partner("x", 16, 20), Partner("y", 16, 20))
    with simulator("limits-workspace-simulator", org, workspaces=workspaces) as sim:
        run = await saturate(
            bootstrap, sim, "workspace", partners, window_s, {"ws": 100, "x": 3_000, "y": 3_000},
            [("default", "requests")], org_limits=org,
        )  # fmt: skip
    remaining = org["rpm"] - run.per_minute("ws", "requests")
    others = run.per_minute("x", "requests") + run.per_minute("y", "requests")
    result["key_429_isolation"] = round(others / remaining, 4)
    result["key_429_workspace_requests_per_minute"] = round(run.per_minute("ws", "requests"), 2)
    result["key_429_upstream_429s"] = run.n429
