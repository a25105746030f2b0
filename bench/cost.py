"""`{"bench": "cost"}`: half price for what can wait, exactly once, to the cent.

A workload as partners send it: three partners, two model classes, prompts from a few
words to a few thousand, `max_tokens` 16 to 1024. Half the requests are `auto` with a
deadline two hours away (a batch), a tenth `auto` with a deadline shorter than the
batch turnaround (real time), the rest `realtime`. The simulator's batches take
`--cost-batch-s` seconds (its compressed clock); the gateway expects 10 s.

Runs, each against a fresh simulator and fresh topics, the gateway as its own process:

- `mixed`: batches on. Cost, deadlines met, and the agreement of the metering records,
  the budgets (`gateway_budget_remaining_usd`) and `gateway_cost_usd_total` (when the
  usage topic exists);
- `all_realtime`: the same workload with batches off, for `cost_ratio_vs_all_realtime`;
- `kill`: batch requests only; the gateway is killed (SIGKILL) while its batches are in
  progress and started again: `batch_lost` / `batch_duplicated` count requests with no
  outcome / more than one, `batch_billed_twice` entries billed in two batches.

Cost is priced from each response's `usage` with the gateway's own pricing module
(`service/admission/pricing.py`: batch usage at half price).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import sys
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import BENCH_DIR, Simulator, create_topics, kafka, log, spawn, tag, tail, terminate
from service.admission.pricing import actual
from service.config.loader import parse_config

PARTNERS = ("north", "south", "west")
MODELS = ("claude-haiku-4-5", "claude-opus-4-1")
BUDGET_USD = 10_000.0
TARGETS = {
    "cost_ratio_vs_all_realtime": ("<=", 0.76),
    "deadline_met_ratio": (">=", 0.999),
    "batch_lost": ("<=", 0),
    "batch_duplicated": ("<=", 0),
    "metering_vs_budget_vs_metrics_max_diff_usd": ("<=", 0.01),
    "cache_hit_publish_p99_ms": ("<=", 20),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cost-requests", type=int, default=600, help="requests per run (default 600)")
    parser.add_argument("--cost-batch-s", type=float, default=3.0, help="simulated batch turnaround")
    parser.add_argument("--cost-seed", type=int, default=7)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def _workload(n: int, seed: int, prefix: str, only_batch: bool = False) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    now = time.time()
    out = []
    for i in range(n):
        roll = rng.random()
        doc: dict[str, Any] = {
            "request_id": f"{prefix}-{i}",
            "params": {
                "model": MODELS[i % len(MODELS)],
                "max_tokens": rng.choice((16, 64, 256, 1024)),
                "messages": [{"role": "user", "content": "lorem ipsum " * rng.choice((3, 40, 400, 2000))}],
            },
        }
        if only_batch or roll < 0.5:
            doc.update(service_class="auto", respond_by=_iso(now + 7200))
        elif roll < 0.6:
            doc.update(service_class="auto", respond_by=_iso(now + 8))
        else:
            doc["service_class"] = "realtime"
        out.append(doc)
    return out


class Run:
    def __init__(self, name: str, bootstrap: str, sim_url: str, batches: bool) -> None:
        self.name = name
        self.t = tag(f"cost-{name}")
        self.bootstrap = bootstrap
        self.sim_url = sim_url
        self.batches = batches
        self.config = BENCH_DIR / f"{self.t}.yaml"
        self.port = _free_port()
        self.log = BENCH_DIR / f"{self.t}.log"

    def topics(self, kind: str) -> list[str]:
        return [f"{self.t}.{kind}.{p}" for p in PARTNERS]

    def write_config(self) -> None:
        cfg: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "group_id": f"{self.t}-gw",
                "request_topic_prefix": f"{self.t}.requests.",
                "response_topic_prefix": f"{self.t}.responses.",
                "deadletter_topic_prefix": f"{self.t}.deadletter.",
                "usage_topic": f"{self.t}.usage",
            },
            "anthropic": {"base_url": self.sim_url},
            "runtime": {"http_port": self.port, "log_level": "WARNING"},
            "batches": {
                "enabled": self.batches,
                "pending_topic": f"{self.t}.pending",
                "state_topic": f"{self.t}.state",
                "max_age_s": 1.0,
                "expected_turnaround_s": 10,
                "margin_s": 2,
                "poll_min_s": 0.5,
                "poll_max_s": 2,
                "create_timeout_s": 5,
                "create_grace_s": 1,
            },
            "partners": [
                {"id": p, "api_key": {"env": "BENCH_COST_KEY"}, "max_concurrency": 16,
                 "budget": {"usd_per_day": BUDGET_USD}}
                for p in PARTNERS
            ],
        }  # fmt: skip
        try:
            parse_config(cfg)
        except Exception:  # usage_topic is new: without it, the metering figure is skipped
            cfg["kafka"].pop("usage_topic")
        self.config.write_text(yaml.safe_dump(cfg))

    def start(self) -> Any:
        import os

        os.environ["BENCH_COST_KEY"] = "sk-bench-cost-0123456789"
        cmd = [sys.executable, "-m", "service", "run", "--config", str(self.config)]
        return spawn(cmd, self.log)


async def _produce(bootstrap: str, topic_of: dict[str, str], docs: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10)
    await producer.start()
    try:
        futures = []
        for i, doc in enumerate(docs):
            topic = topic_of[PARTNERS[i % len(PARTNERS)]]
            futures.append(await producer.send(topic, orjson.dumps(doc), key=doc["request_id"].encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _read(
    bootstrap: str, topics: list[str], until: int, timeout_s: float, settle_s: float = 2.0
) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    try:
        tps = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or {0, 1, 2})]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline, settle = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if settle is None and len(out) >= until:
                settle = time.monotonic() + settle_s
            if settle is not None and time.monotonic() > settle:
                break
            for tp, recs in (await consumer.getmany(timeout_ms=300)).items():
                out += [(tp.topic, orjson.loads(r.value)) for r in recs]
    finally:
        await consumer.stop()
    return out


def _cost(settings: Any, responses: list[dict[str, Any]]) -> float:
    total = 0
    for r in responses:
        price = settings.models.get(r["message"].get("model") or "")
        total += actual(price, r.get("usage") or {}).nusd
    return total / 1e9


async def _one(run: Run, make_docs: Any, timeout_s: float) -> dict[str, Any]:
    """Start the gateway, then build the workload (its deadlines count from now) and send it."""
    run.write_config()
    await create_topics(  # what `service topics ensure` creates, the usage topic included
        run.bootstrap,
        [*run.topics("requests"), *run.topics("responses"), *run.topics("deadletter"), f"{run.t}.usage"],
    )
    proc = run.start()
    try:
        await _ready(run)
        started = time.time()
        docs = make_docs()
        await _produce(run.bootstrap, dict(zip(PARTNERS, run.topics("requests"), strict=True)), docs)
        outcomes = await _read(
            run.bootstrap, [*run.topics("responses"), *run.topics("deadletter")], len(docs), timeout_s
        )
        took = time.time() - started
        usage = await _read(run.bootstrap, [f"{run.t}.usage"], 0, 5, settle_s=1.0)
        text = _scrape(run)
    finally:
        if proc.poll() is not None:
            log(f"the gateway exited early:\n{tail(run.log)}")
        terminate(proc)
    settings = parse_config(yaml.safe_load(run.config.read_text()))
    return {
        "outcomes": outcomes,
        "usage": usage,
        "metrics": text,
        "wall_s": took,
        "settings": settings,
        "docs": docs,
    }


def _scrape(run: Run) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{run.port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


async def _ready(run: Run, timeout_s: float = 60.0) -> None:
    """Until the gateway's /readyz answers 200 (then a second more for the group to settle)."""
    for _ in range(int(timeout_s / 0.5)):
        if await asyncio.to_thread(_answers, run.port):
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _deadlines(docs: list[dict[str, Any]], outcomes: list[Any]) -> tuple[int, int, list[dict[str, Any]]]:
    """(met, total, the first misses) over requests with a deadline: met when a response
    completed by then."""
    by_id = {d["request_id"]: d for d in docs}
    met = total = 0
    missed: list[dict[str, Any]] = []
    for topic, doc in outcomes:
        want = by_id.get(doc.get("request_id"), {}).get("respond_by")
        if want is None:
            continue
        total += 1
        done = (doc.get("timings") or {}).get("completed_at")
        if ".responses." in topic and done is not None and _epoch(done) <= _epoch(want):
            met += 1
        elif len(missed) < 10:
            missed.append(
                {
                    "request_id": doc.get("request_id"),
                    "outcome": "response" if ".responses." in topic else str(doc.get("reason")),
                    "path": (doc.get("served_by") or {}).get("path", "realtime"),
                    "late_s": round(_epoch(done) - _epoch(want), 3) if done else None,
                    "timings": doc.get("timings"),
                }
            )
    return met, total, missed


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _agreement(result: dict[str, Any], cost_usd: float) -> dict[str, Any]:
    """Metering records, budgets and the cost metric, each summed over the run (USD)."""
    text = result["metrics"]
    metric = sum(_samples(text, "gateway_cost_usd_total").values())
    remaining = _samples(text, "gateway_budget_remaining_usd")
    budget = sum(BUDGET_USD - v for k, v in remaining.items() if ("period", "day") in k)
    usage = result["usage"]
    metering = sum(float((doc.get("cost") or {}).get("usd") or 0) for _, doc in usage)
    figures = {"metering_usd": metering, "budget_usd": budget, "metric_usd": metric, "priced_usd": cost_usd}
    present = [v for k, v in figures.items() if k != "metering_usd" or usage]
    diff = max(present) - min(present) if present else None
    return {
        **{k: round(v, 6) for k, v in figures.items()},
        "metering_records": len(usage),
        "max_diff_usd": diff,
    }


async def _mixed(bootstrap: str, args: argparse.Namespace, batches: bool) -> dict[str, Any]:
    def make_docs() -> list[dict[str, Any]]:
        return _workload(args.cost_requests, args.cost_seed, "c")

    name = "mixed" if batches else "realtime"
    with Simulator(["--seed", str(args.cost_seed), "--batch-processing-s", str(args.cost_batch_s),
                    "--latency-s", "0.05"], name=f"sim-cost-{name}") as sim:  # fmt: skip
        run = Run(name, bootstrap, sim.url, batches)
        result = await _one(run, make_docs, timeout_s=300)
        stats = sim.stats()
    responses = [d for t, d in result["outcomes"] if ".responses." in t]
    cost = _cost(result["settings"], responses)
    docs = result["docs"]
    met, total, missed = _deadlines(docs, result["outcomes"])
    served = Counter((d.get("served_by") or {}).get("path", "realtime") for d in responses)
    return {
        "requests": len(docs),
        "outcomes": len(result["outcomes"]),
        "deadletters": len(result["outcomes"]) - len(responses),
        "served": dict(served),
        "cost_usd": round(cost, 6),
        "deadline_met": met,
        "deadline_total": total,
        "deadline_missed": missed,
        "wall_s": round(result["wall_s"], 1),
        "batches_created": (stats.get("batches") or {}).get("created"),
        "agreement": _agreement(result, cost),
    }


async def _kill(bootstrap: str, args: argparse.Namespace) -> dict[str, Any]:
    """Batch requests only; SIGKILL the gateway while its batches are in progress; restart."""
    n = max(60, args.cost_requests // 3)
    docs = _workload(n, args.cost_seed + 1, "k", only_batch=True)
    with Simulator(["--seed", str(args.cost_seed), "--batch-processing-s", str(max(4.0, args.cost_batch_s))],
                   name="sim-cost-kill") as sim:  # fmt: skip
        run = Run("kill", bootstrap, sim.url, True)
        run.write_config()
        topics = [*run.topics("responses"), *run.topics("deadletter")]
        await create_topics(bootstrap, [*run.topics("requests"), *topics])
        first = run.start()
        await _ready(run)
        await _produce(bootstrap, dict(zip(PARTNERS, run.topics("requests"), strict=True)), docs)
        for _ in range(300):  # until a batch is in progress (at most a minute)
            if (sim.stats().get("batches") or {}).get("in_progress"):
                break
            await asyncio.sleep(0.2)
        in_progress = (sim.stats().get("batches") or {}).get("in_progress")
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = run.start()
        try:
            outcomes = await _read(bootstrap, topics, n, timeout_s=240, settle_s=3.0)
        finally:
            terminate(second)
        calls = _calls(sim.url)
    ids = Counter(d.get("request_id") for _, d in outcomes)
    wanted = {d["request_id"] for d in docs}
    billed_twice = sum(1 for v in calls.values() if v.get("billed", 0) > 1)
    return {
        "requests": n,
        "killed_with_batches_in_progress": in_progress,
        "batch_lost": len(wanted - set(ids)),
        "batch_duplicated": sum(c - 1 for c in ids.values() if c > 1),
        "batch_billed_twice": billed_twice,
    }


def _calls(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/calls", timeout=10) as resp:
        data: dict[str, Any] = orjson.loads(resp.read())
    return dict(data.get("batch_calls_by_custom_id") or {})


def _targets(figures: dict[str, Any]) -> dict[str, bool]:
    met = {}
    for name, (op, bound) in TARGETS.items():
        value = figures.get(name)
        if value is not None:
            met[name] = value <= bound if op == "<=" else value >= bound
    return met


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with kafka() as bootstrap:
        mixed = await _mixed(bootstrap, args, batches=True)
        realtime = await _mixed(bootstrap, args, batches=False)
        killed = await _kill(bootstrap, args)
    figures: dict[str, Any] = {
        "cost_ratio_vs_all_realtime": round(mixed["cost_usd"] / realtime["cost_usd"], 4)
        if realtime["cost_usd"]
        else None,
        "deadline_met_ratio": round(mixed["deadline_met"] / mixed["deadline_total"], 4)
        if mixed["deadline_total"]
        else None,
        "batch_lost": killed["batch_lost"],
        "batch_duplicated": killed["batch_duplicated"],
        "batch_billed_twice": killed["batch_billed_twice"],
        "metering_vs_budget_vs_metrics_max_diff_usd": mixed["agreement"]["max_diff_usd"],
    }
    cache = await _cache_latency()
    figures["cache_hit_publish_p99_ms"] = cache.get("hit_publish_p99_ms")
    return {
        "bench": "cost",
        **figures,
        "targets_met": _targets(figures),
        "mixed": mixed,
        "all_realtime": realtime,
        "kill": killed,
        "response_cache": cache,
    }


async def _cache_latency() -> dict[str, Any]:
    """bench/response_cache.py with its defaults but 8 s phases: a hit's publish latency
    (record received to response committed), exactly once. In a process of its own, as when
    run alone: its gateway runs in the bench's process, and this one has run the phases above."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.response_cache", "--response-cache-seconds", "8",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench.response_cache exited {proc.returncode}")
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    result.pop("bench", None)
    return result
