"""The soak benchmark: the gateway's RSS stays flat under pause/resume churn.

One gateway process, three partners with `max_queue: 20`, `kafka.max_poll_records: 20`,
fed ~100 requests/s of mixed shapes (prompts of 10 B to 20 KB, three models, `max_tokens`
16..512, some with a system prompt or stop sequences, 1% malformed, 3% answered 500/529)
against a simulator whose latency (~0.6 s a call) makes each partner's bound of 20
outstanding requests the binding one: its partitions are paused, resumed and re-positioned
all run long. A backlog of up to `--soak-backlog` requests stays in Kafka, so every fetch
brings more than can start and the churn never stops (`paused_share`: the share of samples
that found a partition paused).

RSS (VmRSS from /proc/<pid>/status) is sampled every `--soak-sample-s` seconds after the
warm-up (the allocator's working set takes a minute or so to settle). `rss_start_mb` and
`rss_end_mb` are medians of the first and the last fifth of the samples; the run passes when
`growth_ratio` = end / start - 1 is at most `--soak-max-growth` (10%), `peak_ratio` = highest
sample / start - 1 at most twice that (a leak that one collection trims just before the end
is still caught), the gateway kept answering and it stopped cleanly. `python -m bench --only
soak` exits 1 when it does not pass (`make soak`); `tests/integration/test_soak.py` is the
short version.

What it guards (issue 9): aiokafka's fetch buffers dropped on pause or seek were garbage
cycles (`service/ingest/fetch_cycles.py`), and the collector tuned to (20000, 50, 100) after
`gc.freeze()` never ran a full collection (`service/gc_policy.py`): 338 MB to 2,118 MB in 100 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import socket
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from bench import common
from bench.common import BENCH_DIR, Simulator, log

FILES = BENCH_DIR / "soak"

PARTNERS = ("acme", "globex", "initech")
MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-1")  # the gateway's priced models
MAX_TOKENS = (16, 64, 128, 256, 512)
PROMPT_BYTES = (10, 20 * 1024)
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "tempor")
MALFORMED_SHARE = 0.01
EDGE_SHARE = 0.2
"""The start (end) figure is the median of the first (last) fifth of the samples, at least 3:
RSS swings by a few fetch buffers between samples, a median of several is steady."""
EDGE_MIN = 3
FLOWING = 50
"""Outcomes before the warm-up starts: on a broker new to transactions the first ones took
~40 s to commit (a NotLeaderForPartition, then NotEnoughReplicas, on the topics they
created), and no RSS figure of that idle time means anything."""
START_TIMEOUT_S = 180.0


@dataclass
class SoakConfig:
    duration_s: float = 600.0
    """Measured time, after the warm-up."""
    warmup_s: float = 120.0
    rate: float = 100.0
    """Requests produced per second (fewer while the backlog is full)."""
    sample_s: float = 5.0
    max_growth: float = 0.10
    backlog: int = 3_000
    """Requests produced and not yet answered, at most: the producer waits above it."""
    max_queue: int = 20
    max_poll_records: int = 20
    partitions: int = 3
    seed: int = 7

    def simulator(self) -> dict[str, Any]:
        """The simulator's config: ~0.6 s a call, so 20 outstanding cap a partner near 33/s."""
        return {
            "seed": self.seed,
            "latency": {
                "distribution": "lognormal",
                "median_s": 0.45,
                "sigma": 0.3,
                "per_output_token_s": 0.001,
            },
            "output": {"distribution": "uniform", "min_tokens": 8, "max_tokens": 300},
            "faults": {"api_error_rate": 0.01, "overloaded_rate": 0.02},
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SoakConfig()
    g = parser.add_argument_group("soak")
    g.add_argument(
        "--soak-duration-s", type=float, default=d.duration_s, help="measured seconds after warm-up"
    )
    g.add_argument(
        "--soak-warmup-s", type=float, default=d.warmup_s, help="seconds before the first RSS figure"
    )
    g.add_argument("--soak-rate", type=float, default=d.rate, help="requests produced per second")
    g.add_argument("--soak-sample-s", type=float, default=d.sample_s, help="seconds between RSS samples")
    g.add_argument(
        "--soak-max-growth", type=float, default=d.max_growth, help="allowed RSS growth (0.10 = 10%%)"
    )
    g.add_argument("--soak-backlog", type=int, default=d.backlog, help="unanswered requests kept in Kafka")


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        duration_s=args.soak_duration_s,
        warmup_s=args.soak_warmup_s,
        rate=args.soak_rate,
        sample_s=args.soak_sample_s,
        max_growth=args.soak_max_growth,
        backlog=args.soak_backlog,
    )


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid`, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def request_value(rng: random.Random, request_id: str) -> bytes:
    """A request of random shape: prompt length log-uniform in 10 B..20 KB, model, max_tokens."""
    if rng.random() < MALFORMED_SHARE:
        return b'{"request_id": "' + request_id.encode() + b'", "params": {"model": 7}}'
    lo, hi = PROMPT_BYTES
    size = int(lo * (hi / lo) ** rng.random())
    text = " ".join(rng.choice(WORDS) for _ in range(size // 6 + 1))[:size]
    params: dict[str, Any] = {
        "model": rng.choice(MODELS),
        "max_tokens": rng.choice(MAX_TOKENS),
        "messages": [{"role": "user", "content": text}],
    }
    if rng.random() < 0.3:
        params["system"] = "You are a terse assistant."
    if rng.random() < 0.2:
        params["stop_sequences"] = ["\n\n"]
    doc = {
        "request_id": request_id,
        "params": params,
        "metadata": {"source": "soak", "prompt_bytes": str(size)},
    }
    return orjson.dumps(doc)


def gateway_config(
    tag: str, bootstrap: str, sim_url: str, cfg: SoakConfig, files: Path, port: int
) -> dict[str, Any]:
    partners = []
    for p in PARTNERS:
        key = files / "keys" / f"{p}.key"
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(f"sk-ant-soak-{p}\n")
        partners.append(
            {"id": p, "max_queue": cfg.max_queue, "max_concurrency": 32, "api_key": {"file": str(key)}}
        )
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"{tag}-gateway",
            "request_topic_prefix": f"{tag}.requests.",
            "response_topic_prefix": f"{tag}.responses.",
            "deadletter_topic_prefix": f"{tag}.deadletter.",
            "max_poll_records": cfg.max_poll_records,
        },
        "anthropic": {"base_url": sim_url, "timeout_s": 30},
        "retry": {"base_delay_s": 0.05, "max_delay_s": 0.5, "max_attempts": 4},
        "runtime": {"http_host": "127.0.0.1", "http_port": port, "log_level": "INFO"},
        "partners": partners,
    }


class _Gateway:
    """The gateway process's own view, from its /metrics: outcomes so far, partitions paused."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def _scrape(self) -> tuple[int, int]:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return -1, 0
        outcomes = paused = 0.0
        for family in text_string_to_metric_families(text):
            if family.name == "gateway_requests":
                outcomes += sum(s.value for s in family.samples if s.name.endswith("_total"))
            elif family.name == "gateway_paused_partitions":
                paused += sum(s.value for s in family.samples)
        return int(outcomes), int(paused)

    async def scrape(self) -> tuple[int, int]:
        """(outcomes, paused partitions); outcomes -1 while the endpoint does not answer."""
        return await asyncio.to_thread(self._scrape)


class _Traffic:
    """Produces at `rate`, round-robin over the partners, holding while the backlog is full."""

    def __init__(self, bootstrap: str, tag: str, cfg: SoakConfig, gateway: _Gateway) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks=1, linger_ms=5, max_request_size=8 * 1024 * 1024
        )
        self._tag, self._cfg, self._gateway = tag, cfg, gateway
        self._rng = random.Random(cfg.seed)
        self.sent = 0
        self.answered = 0

    async def _refresh(self) -> None:
        outcomes, _ = await self._gateway.scrape()
        self.answered = max(self.answered, outcomes)

    async def run(self, stop: asyncio.Event) -> None:
        await self._producer.start()
        try:
            interval = 1.0 / self._cfg.rate
            due = time.monotonic()
            while not stop.is_set():
                if self.sent - self.answered >= self._cfg.backlog:
                    await asyncio.sleep(0.1)
                    await self._refresh()
                    due = time.monotonic()
                    continue
                partner = PARTNERS[self.sent % len(PARTNERS)]
                rid = f"{self._tag}-{self.sent}"
                value = request_value(self._rng, rid)
                await self._producer.send(f"{self._tag}.requests.{partner}", value, key=rid.encode())
                self.sent += 1
                if self.sent % 100 == 0:
                    await self._refresh()
                due += interval
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -1.0:  # fell behind (a slow send): do not burst to catch up
                    due = time.monotonic()
        finally:
            await self._producer.stop()


def _edge(samples: list[int], last: bool) -> float:
    n = max(EDGE_MIN, round(len(samples) * EDGE_SHARE))
    return float(statistics.median(samples[-n:] if last else samples[:n]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Samples:
    rss: list[tuple[float, int]] = field(default_factory=list)
    paused: int = 0
    """Samples that found a partition paused (the churn is on)."""
    outcomes_at_start: int = 0


async def soak(
    bootstrap: str,
    sim_url: str,
    cfg: SoakConfig,
    files: Path,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run one gateway under churn; the result line (see the module docstring)."""
    tag = common.tag("soak")
    topics = [f"{tag}.{kind}.{p}" for p in PARTNERS for kind in ("requests", "responses", "deadletter")]
    await common.create_topics(bootstrap, topics, partitions=cfg.partitions)
    port = _free_port()
    config_path = files / f"{tag}.yaml"
    config_path.write_text(yaml.safe_dump(gateway_config(tag, bootstrap, sim_url, cfg, files, port)))
    log_path = files / f"{tag}.log"
    cmd = [*(command or [sys.executable, "-m", "service", "run"]), "--config", str(config_path)]
    proc = common.spawn(cmd, log_path)
    gateway = _Gateway(port)
    samples = _Samples()
    stop = asyncio.Event()
    traffic = _Traffic(bootstrap, tag, cfg, gateway)
    producing = asyncio.create_task(traffic.run(stop))
    began = time.monotonic()
    answering: float | None = None  # the warm-up counts from when outcomes flow
    try:
        end = began + START_TIMEOUT_S
        while (now := time.monotonic()) < end:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited ({proc.returncode}):\n{common.tail(log_path)}")
            if producing.done():
                producing.result()  # raises what stopped it
            rss = rss_bytes(proc.pid)
            outcomes, paused = await gateway.scrape()
            if answering is None and outcomes >= FLOWING:
                answering = now
                end = now + cfg.warmup_s + cfg.duration_s
            if answering is not None and now - answering >= cfg.warmup_s:
                if not samples.rss:
                    samples.outcomes_at_start = outcomes
                samples.rss.append((now - began, rss))
                samples.paused += paused > 0
            log(f"soak: {now - began:5.0f}s rss {rss / 2**20:6.1f} MB, {traffic.sent} sent, {outcomes} done")
            await asyncio.sleep(max(0.0, min(cfg.sample_s, end - time.monotonic())))
        if answering is None:
            raise RuntimeError(f"no outcome in {START_TIMEOUT_S:.0f} s:\n{common.tail(log_path)}")
        outcomes, _ = await gateway.scrape()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await producing
        code = await asyncio.to_thread(common.terminate, proc, 60)
    return _result(cfg, samples, traffic.sent, outcomes, code)


def _result(cfg: SoakConfig, samples: _Samples, sent: int, outcomes: int, code: int) -> dict[str, Any]:
    rss = [r for _, r in samples.rss]
    if len(rss) < 2 * EDGE_MIN:
        raise RuntimeError(f"only {len(rss)} RSS samples after the warm-up: lengthen the run")
    start, end = _edge(rss, last=False), _edge(rss, last=True)
    growth = end / start - 1
    peak = max(rss) / start - 1
    measured = outcomes - samples.outcomes_at_start
    span = samples.rss[-1][0] - samples.rss[0][0]
    mb = 2**20
    return {
        "bench": "soak",
        "duration_s": cfg.duration_s,
        "warmup_s": cfg.warmup_s,
        "rss_start_mb": round(start / mb, 1),
        "rss_end_mb": round(end / mb, 1),
        "rss_max_mb": round(max(rss) / mb, 1),
        "rss_min_mb": round(min(rss) / mb, 1),
        "growth_ratio": round(growth, 4),
        "peak_ratio": round(peak, 4),
        "max_growth": cfg.max_growth,
        "requests": sent,
        "outcomes": outcomes,
        "outcomes_per_s": round(measured / span, 1) if span > 0 else None,
        "paused_share": round(samples.paused / len(rss), 2),
        "exit_code": code,
        "pass": growth <= cfg.max_growth and peak <= 2 * cfg.max_growth and code == 0 and measured > 0,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("duration_s", "max_growth")},
        "rss_samples_mb": [[round(t, 1), round(r / mb, 1)] for t, r in samples.rss],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config_from_args(args)
    shutil.rmtree(FILES, ignore_errors=True)
    FILES.mkdir(parents=True)
    sim_config = FILES / "simulator.yaml"
    sim_config.write_text(yaml.safe_dump(cfg.simulator()))
    with common.kafka() as bootstrap, Simulator(["--config", str(sim_config)], name="soak/simulator") as sim:
        result = await soak(bootstrap, sim.url, cfg, FILES)
    if not result["pass"]:
        log(f"soak: FAILED, RSS grew {100 * result['growth_ratio']:.1f}% (limit {100 * cfg.max_growth:.0f}%)")
    return result


def passed(result: dict[str, Any]) -> bool:
    """What `python -m bench` uses to turn a failed soak into exit status 1."""
    return bool(result.get("pass"))
