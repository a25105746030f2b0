"""What one replica pays for exactly-once with many request partitions: 300 by default.

One gateway process is given all the request partitions of `--eos-scale-partners` partners of
`--eos-scale-partitions` partitions each (3 x 100), first with `kafka.exactly_once: true` (one
transactional producer per partition), then with `false` (the shared idempotent producer), on
the same broker and simulator (zero latency, no limits). For each mode:

- takeover: one request was produced to every request partition before the process started;
  the time from its first assignment (the "partitions assigned" log line) until all of them
  have their outcome (read committed) is the time to take every partition over, measured from
  outside: a partition answers only once its writer fenced the previous owner, read the commit
  and the consumer was positioned (`takeover_s`; `from_spawn_s` counts start-up too);
- a modest load (`--eos-scale-rate` requests per second of the realistic mix for
  `--eos-scale-seconds`) spread over every partition: end-to-end latency (send to outcome read
  committed), the process's CPU per message and the broker's;
- resources, sampled each second during the load: transactional producers open
  (`gateway_eos_writers` on /metrics), TCP connections of the process to the broker (psutil),
  RSS; and the CPU share while idle afterwards (`--eos-scale-idle-s`) with every partition open;
- a burst (`--eos-scale-burst` requests spread over every partition, produced at once): the
  drain rate from its first outcome to its last, CPU and transactions per message;
- `stop_s`: SIGTERM to exit (every writer commits and closes).

`per_partition` divides the eos - off differences by the partitions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench import common, latency, traffic
from bench.common import BENCH_DIR, CommittedCounter, Simulator, log
from bench.pipeline import SIM_ARGS, service_config, source_state

FILES = BENCH_DIR / "eos_scale"
OUT_PARTITIONS = 10
MODES = ("eos", "off")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("eos_scale")
    g.add_argument("--eos-scale-partners", type=int, default=3, help="partners (request topics)")
    g.add_argument("--eos-scale-partitions", type=int, default=100, help="partitions per request topic")
    g.add_argument("--eos-scale-rate", type=float, default=50.0, help="requests per second of the load")
    g.add_argument("--eos-scale-seconds", type=float, default=20.0, help="duration of the load")
    g.add_argument("--eos-scale-idle-s", type=float, default=5.0, help="idle time measured after the load")
    g.add_argument(
        "--eos-scale-burst", type=int, default=3000, help="requests of the burst, over every partition"
    )
    g.add_argument("--eos-scale-timeout-s", type=float, default=180.0, help="at most this for the takeover")
    g.add_argument(
        "--eos-scale-latency-s",
        type=float,
        default=0.0,
        help="the simulator's call latency (0: none; real calls take seconds)",
    )
    g.add_argument(
        "--eos-scale-eos-producers",
        type=int,
        default=None,
        help="kafka.eos_producers of the exactly-once run (default: the service's, 2)",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Samples:
    writers: list[float] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def stat(v: list[Any]) -> dict[str, float]:
            return {"median": round(statistics.median(v), 1), "max": round(max(v), 1)} if v else {}

        return {
            "eos_writers": stat(self.writers),
            "broker_connections": stat(self.connections),
            "rss_mb": stat(self.rss_mb),
        }


class Gateway:
    """The gateway process under test, and what can be seen of it from outside."""

    def __init__(
        self, mode: str, tag: str, bootstrap: str, sim_url: str, partners: list[str], producers: int | None
    ) -> None:
        self.port = _free_port()
        self.broker_port = int(bootstrap.rsplit(":", 1)[1])
        self.log_path = FILES / f"{tag}.log"
        cfg = service_config(
            tag,
            bootstrap,
            sim_url,
            [{"id": p} for p in partners],
            exactly_once=mode == "eos",
            files=FILES,
            http_port=self.port,
        )
        cfg["runtime"]["log_level"] = "INFO"  # the "partitions assigned" line
        if producers is not None and mode == "eos":
            cfg["kafka"]["eos_producers"] = producers
        config = FILES / f"{tag}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        self.cmd = [sys.executable, "-m", "service", "run", "--config", str(config)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = common.spawn(self.cmd, self.log_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def assigned_at(self) -> float | None:
        """Wall time of the first "partitions assigned" log line."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if '"partitions assigned"' in line and '"ts":"' in line:
                ts = line.split('"ts":"', 1)[1].split('"', 1)[0]
                return datetime.fromisoformat(ts).timestamp()
        return None

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on /metrics (NaN when it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return float("nan")
        for family in text_string_to_metric_families(text):
            if family.name == name:
                return float(sum(s.value for s in family.samples))
        return float("nan")

    async def transactions(self) -> float:
        """Transactions committed so far (`gateway_eos_transactions`)."""
        return await asyncio.to_thread(self.metric, "gateway_eos_transactions")

    def connections(self) -> int:
        """TCP connections of the process to the broker."""
        conns = psutil.Process(self.pid).net_connections(kind="tcp")
        return sum(1 for c in conns if c.raddr and c.raddr.port == self.broker_port)

    def rss_mb(self) -> float:
        return float(psutil.Process(self.pid).memory_info().rss) / 2**20

    async def sample(self, into: Samples) -> None:
        into.writers.append(await asyncio.to_thread(self.metric, "gateway_eos_writers"))
        into.connections.append(self.connections())
        into.rss_mb.append(self.rss_mb())


async def _sampling(gw: Gateway, into: Samples, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await gw.sample(into)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _takeover(gw: Gateway, counter: CommittedCounter, n: int, timeout_s: float) -> dict[str, Any]:
    """Start the gateway; wait until the `n` requests (one per partition) have their outcomes."""
    spawned = time.time()
    gw.start()
    deadline = time.monotonic() + timeout_s
    marks: dict[str, float] = {}
    while True:
        seen = await counter.count()
        now = time.time()
        for share in (0.5, 0.9):
            if seen >= share * n and f"p{int(share * 100)}" not in marks:
                marks[f"p{int(share * 100)}"] = now
        if seen >= n:
            break
        if gw.proc is not None and gw.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited ({gw.proc.returncode}):\n{common.tail(gw.log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{seen} of {n} partitions answered in {timeout_s:.0f}s")
        await asyncio.sleep(0.02)
    assigned = gw.assigned_at() or float("nan")
    return {
        "takeover_s": round(now - assigned, 2),
        "takeover_half_s": round(marks["p50"] - assigned, 2),
        "takeover_90pct_s": round(marks["p90"] - assigned, 2),
        "assigned_after_spawn_s": round(assigned - spawned, 2),
        "from_spawn_s": round(now - spawned, 2),
    }


@dataclass
class Topics:
    requests: list[str]
    outputs: list[str]
    partitions: int


async def _load(gw: Gateway, t: Topics, bootstrap: str, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """The paced load over every partition: latency, CPU per message, resources; then idle."""
    samples = Samples()
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sampling(gw, samples, stop))
    broker = common.broker_pid()
    cpu0, broker0 = common.cpu_seconds(gw.pid), common.cpu_quiet(broker)
    txn0, t0 = await gw.transactions(), _now()
    lat = await latency.measure(
        bootstrap,
        t.requests,
        t.outputs,
        out_partitions=OUT_PARTITIONS,
        partitions=t.partitions,
        rate=args.eos_scale_rate,
        seconds=args.eos_scale_seconds,
        seed=4,
        prefix=f"{tag}-load",
    )
    cpu1, broker1 = common.cpu_seconds(gw.pid), common.cpu_quiet(broker)
    txn1, t1 = await gw.transactions(), _now()
    stop.set()
    await sampler
    if lat.answered < lat.sent:
        raise RuntimeError(f"{lat.sent - lat.answered} of {lat.sent} requests of the load got no outcome")
    await asyncio.sleep(args.eos_scale_idle_s)
    cpu2, t2 = common.cpu_seconds(gw.pid), _now()
    msgs = max(1, lat.answered)
    return {
        "load": lat.summary(),
        "cpu_ms_per_msg": round(1000 * (cpu1 - cpu0) / msgs, 3),
        "cpu_pct_under_load": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "broker_cpu_ms_per_msg": round(1000 * (broker1 - broker0) / msgs, 3),
        "transactions_per_msg": round((txn1 - txn0) / msgs, 2),
        "idle_cpu_pct": round(100 * (cpu2 - cpu1) / (t2 - t1), 1),
        "under_load": samples.summary(),
        "threads": psutil.Process(gw.pid).num_threads(),
    }


async def _burst(gw: Gateway, t: Topics, bootstrap: str, n: int, tag: str) -> dict[str, Any]:
    """`n` requests spread over every partition at once: the drain rate, from the first
    outcome to the last (read committed), and the CPU per message over the same window."""
    per_topic = max(1, n // len(t.requests))
    n = per_topic * len(t.requests)
    async with CommittedCounter(bootstrap, t.outputs, OUT_PARTITIONS) as counter:
        base = await _settled(counter)
        producing = asyncio.gather(
            *(
                traffic.produce(
                    bootstrap, topic, per_topic, f"{tag}-burst-{i}", seed=5 + i, partitions=t.partitions
                )
                for i, topic in enumerate(t.requests)
            )
        )
        first: tuple[float, float, float, int] | None = None
        deadline = _now() + 300
        while True:
            seen = await counter.count() - base
            if seen > 0 and first is None:
                first = (_now(), common.cpu_seconds(gw.pid), await gw.transactions(), seen)
            if seen >= n:
                break
            if _now() > deadline:
                raise RuntimeError(f"only {seen} of the {n} burst requests answered in 300s")
            await asyncio.sleep(0.02)
        end, cpu, txn = _now(), common.cpu_seconds(gw.pid), await gw.transactions()
        await producing
    assert first is not None
    msgs = n - first[3]
    return {
        "requests": n,
        "msgs_per_s": round(msgs / (end - first[0]), 1),
        "cpu_ms_per_msg": round(1000 * (cpu - first[1]) / msgs, 3),
        "transactions_per_msg": round((txn - first[2]) / msgs, 2),
    }


async def _settled(counter: CommittedCounter) -> int:
    """Outcomes already there (the counter reads from the beginning): until a count holds."""
    last = -1
    while True:
        seen = await counter.count()
        if seen == last:
            return seen
        last = seen
        await asyncio.sleep(0.5)


def _now() -> float:
    return time.perf_counter()


async def _mode(mode: str, bootstrap: str, sim: Simulator, args: argparse.Namespace) -> dict[str, Any]:
    tag = common.tag(f"scale-{mode}")
    partners = [f"p{i}" for i in range(args.eos_scale_partners)]
    parts = args.eos_scale_partitions
    t = Topics(
        [f"{tag}.requests.{p}" for p in partners],
        [f"{tag}.{kind}.{p}" for p in partners for kind in ("responses", "deadletter")],
        parts,
    )
    await common.create_topics(bootstrap, t.requests, parts)
    await common.create_topics(bootstrap, t.outputs, OUT_PARTITIONS)
    for topic in t.requests:  # the first wave: one request per partition
        await traffic.produce(bootstrap, topic, parts, f"{tag}-{topic}-first", seed=3, partitions=parts)
    first = len(t.requests) * parts
    gw = Gateway(mode, tag, bootstrap, sim.url, partners, args.eos_scale_eos_producers)
    result: dict[str, Any] = {"partitions": first}
    try:
        async with CommittedCounter(bootstrap, t.outputs, OUT_PARTITIONS) as counter:
            result.update(await _takeover(gw, counter, first, args.eos_scale_timeout_s))
        log(f"{mode}: {first} partitions answered {result['takeover_s']}s after assignment")
        samples = Samples()
        await gw.sample(samples)
        result["after_takeover"] = samples.summary()
        result.update(await _load(gw, t, bootstrap, args, tag))
        log(f"{mode}: load {result['load']}")
        result["burst"] = await _burst(gw, t, bootstrap, args.eos_scale_burst, tag)
        log(f"{mode}: burst {result['burst']}")
    finally:
        if gw.proc is not None:
            began = _now()
            code = await asyncio.to_thread(common.terminate, gw.proc, 90)
            result["stop_s"] = round(_now() - began, 2)
            result["exit_code"] = code
    if result["exit_code"] != 0:
        raise RuntimeError(f"the {mode} gateway exited {result['exit_code']}:\n{common.tail(gw.log_path)}")
    return result


def _diff(eos: dict[str, Any], off: dict[str, Any], path: list[str], per: int) -> float:
    a: Any = eos
    b: Any = off
    for k in path:
        a, b = a[k], b[k]
    return round((float(a) - float(b)) / per, 3)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shutil.rmtree(FILES, ignore_errors=True)
    FILES.mkdir(parents=True)
    load_before = os.getloadavg()[0]
    modes: dict[str, dict[str, Any]] = {}
    sim_args = [*SIM_ARGS]
    sim_args[sim_args.index("--latency-s") + 1] = str(args.eos_scale_latency_s)
    with common.kafka() as bootstrap, Simulator(sim_args, name="eos_scale/simulator") as sim:
        for mode in MODES:
            modes[mode] = await _mode(mode, bootstrap, sim, args)
    eos, off = modes["eos"], modes["off"]
    n = eos["partitions"]
    return {
        "bench": "eos_scale",
        "partitions": n,
        "partners": args.eos_scale_partners,
        "eos_producers": args.eos_scale_eos_producers,
        "latency_s": args.eos_scale_latency_s,
        "eos_writers": eos["under_load"]["eos_writers"].get("max"),
        "eos_broker_connections": eos["under_load"]["broker_connections"].get("max"),
        "off_broker_connections": off["under_load"]["broker_connections"].get("max"),
        "eos_rss_mb": eos["under_load"]["rss_mb"].get("max"),
        "off_rss_mb": off["under_load"]["rss_mb"].get("max"),
        "eos_takeover_s": eos["takeover_s"],
        "off_takeover_s": off["takeover_s"],
        "eos_stop_s": eos["stop_s"],
        "off_stop_s": off["stop_s"],
        "eos_idle_cpu_pct": eos["idle_cpu_pct"],
        "off_idle_cpu_pct": off["idle_cpu_pct"],
        "eos_cpu_ms_per_msg": eos["cpu_ms_per_msg"],
        "off_cpu_ms_per_msg": off["cpu_ms_per_msg"],
        "eos_burst_msgs_per_s": eos["burst"]["msgs_per_s"],
        "off_burst_msgs_per_s": off["burst"]["msgs_per_s"],
        "eos_burst_transactions_per_msg": eos["burst"]["transactions_per_msg"],
        "eos_load_transactions_per_msg": eos["transactions_per_msg"],
        "eos_latency_p50_ms": eos["load"]["p50_ms"],
        "eos_latency_p99_ms": eos["load"]["p99_ms"],
        "off_latency_p50_ms": off["load"]["p50_ms"],
        "off_latency_p99_ms": off["load"]["p99_ms"],
        "per_partition": {
            "rss_kb": round(1024 * _diff(eos, off, ["under_load", "rss_mb", "max"], n), 1),
            "broker_connections": _diff(eos, off, ["under_load", "broker_connections", "max"], n),
        },
        "load": {"rate_per_s": args.eos_scale_rate, "seconds": args.eos_scale_seconds},
        "modes": modes,
        "cpus": os.cpu_count(),
        "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "source": source_state(),
    }
