"""The gateway's overhead: the service (exactly-once on, and off) against a bare loop.

Three contenders run as processes against the same zero-latency simulator (a separate process,
no limits, no faults) and the same broker, each on its own backlog of N requests of the
realistic mix (`bench.traffic`: prompts of tens of bytes to tens of KB, three models, varied
max_tokens), pre-produced before any contender starts and identical for all of them:

- `bare`: a consume -> Claude -> produce loop (`bench.bare`);
- `eos`: the service with `kafka.exactly_once: true` (the default);
- `off`: the service with `kafka.exactly_once: false` (at-least-once).

They run in alternating rounds (the order rotates each round) and the medians over rounds
are reported:

- throughput: outcomes per second between the contender's first visible outcome and its N-th
  (visible = read by a `read_committed` consumer: with exactly-once, once its transaction
  committed);
- CPU per message: the contender's user + system CPU over the same window, divided by the
  outcomes in it (interpreter start-up, imports and the group join are excluded);
- end-to-end latency (service runs only): once the backlog is done, the same process gets a
  paced load (`--pipeline-latency-rate` per second for `--pipeline-latency-s`) on another
  partner's topic; a request's latency runs from the producer's send to its outcome reaching
  a `read_committed` consumer (`bench.latency`). "Added latency" is eos minus off.

Zero upstream latency is the worst case for exactly-once's relative cost: with real calls of
seconds the tick (`kafka.eos_tick_ms`) and the transaction are a small part of a request.

Targets: throughput ratio service/bare >= 0.8 and CPU-per-message ratio <= 1.3 (service =
the default, exactly-once); exactly-once costs at most 15% of throughput (eos/off >= 0.85).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import common, latency, traffic
from bench.common import BENCH_DIR, CommittedCounter, Measurement, Simulator, log
from bench.latency import Latencies, percentile

FILES = BENCH_DIR / "pipeline"  # configs and logs of the last run

THROUGHPUT_RATIO_MIN = 0.8
CPU_RATIO_MAX = 1.3
EOS_THROUGHPUT_RATIO_MIN = 0.85
CONTENDERS = ("bare", "eos", "off")
PARTNER = "p0"  # the backlog
LAT_PARTNER = "lat"  # the paced load of the latency phase
PARTITIONS = 3
SIM_ARGS = [
    "--latency-s", "0", "--rpm", "0", "--itpm", "0", "--otpm", "0", "--count-tokens-rpm", "0",
    *traffic.SIM_OUTPUT_ARGS, "--seed", "1",
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("pipeline")
    g.add_argument("--pipeline-n", type=int, default=3000, help="requests per contender run")
    g.add_argument("--pipeline-rounds", type=int, default=3, help="runs of each contender (alternating)")
    g.add_argument("--pipeline-concurrency", type=int, default=64, help="Claude calls in flight, all")
    g.add_argument("--pipeline-latency-rate", type=float, default=100.0, help="paced requests per second")
    g.add_argument("--pipeline-latency-s", type=float, default=8.0, help="paced load duration per run")
    g.add_argument("--pipeline-seed", type=int, default=1, help="seed of the request mix")


@dataclass
class Run:
    contender: str  # one of CONTENDERS
    round: int
    tag: str

    @property
    def service(self) -> bool:
        return self.contender != "bare"

    def request_topic(self, partner: str = PARTNER) -> str:
        return f"{self.tag}.requests.{partner}"

    def output_topics(self, partner: str = PARTNER) -> list[str]:
        if not self.service:
            return [f"{self.tag}.answers"]
        return [f"{self.tag}.responses.{partner}", f"{self.tag}.deadletter.{partner}"]

    def topics(self) -> list[str]:
        out = [self.request_topic(), *self.output_topics()]
        if self.service:
            out += [self.request_topic(LAT_PARTNER), *self.output_topics(LAT_PARTNER)]
        return out

    @property
    def log_path(self) -> Path:
        return FILES / f"{self.tag}.log"


@dataclass
class Result:
    run: Run
    m: Measurement
    lat: Latencies | None
    load_avg: float
    """The machine's 1-minute load average when the run started (others share it)."""


def service_config(
    tag: str,
    bootstrap: str,
    sim_url: str,
    partners: list[dict[str, Any]],
    *,
    exactly_once: bool,
    files: Path = FILES,
    http_port: int = 0,
) -> dict[str, Any]:
    """A gateway config for the benches (`partners`: their settings, key files added here)."""
    keys = files / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    for p in partners:
        key_file = keys / f"{p['id']}.key"
        key_file.write_text(f"sk-ant-bench-{p['id']}\n")
        p.setdefault("api_key", {"file": str(key_file)})
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"{tag}-gateway",
            "request_topic_prefix": f"{tag}.requests.",
            "response_topic_prefix": f"{tag}.responses.",
            "deadletter_topic_prefix": f"{tag}.deadletter.",
            "exactly_once": exactly_once,
        },
        "anthropic": {"base_url": sim_url, "timeout_s": 30},
        "runtime": {"http_host": "127.0.0.1", "http_port": http_port},
        "partners": partners,
    }


def _start(run: Run, bootstrap: str, sim_url: str, n: int, concurrency: int) -> subprocess.Popen[bytes]:
    if run.contender == "bare":
        cmd = [
            sys.executable, "-m", "bench.bare", "--bootstrap", bootstrap, "--topic", run.request_topic(),
            "--out-topic", run.output_topics()[0], "--sim-url", sim_url, "--n", str(n),
            "--group", f"{run.tag}-bare", "--concurrency", str(concurrency),
        ]  # fmt: skip
    else:
        partners = [{"id": p, "max_concurrency": concurrency} for p in (PARTNER, LAT_PARTNER)]
        cfg = service_config(run.tag, bootstrap, sim_url, partners, exactly_once=run.contender == "eos")
        config = FILES / f"{run.tag}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "service", "run", "--config", str(config)]
    return common.spawn(cmd, run.log_path)


def _stop_bare(proc: subprocess.Popen[bytes]) -> int:
    try:  # it exits by itself after N records
        return int(proc.wait(timeout=30))
    except subprocess.TimeoutExpired:
        return common.terminate(proc, 60)


def _keep(proc: subprocess.Popen[bytes]) -> None:
    """The service runs on after the backlog: the latency phase comes next."""


async def _run_one(
    r: Run, bootstrap: str, sim_url: str, args: argparse.Namespace, watch: dict[str, int]
) -> Result:
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        procs.append(_start(r, bootstrap, sim_url, args.pipeline_n, args.pipeline_concurrency))
        return procs[-1]

    lat: Latencies | None = None
    code: int | None = None
    load_avg = os.getloadavg()[0]
    try:
        async with CommittedCounter(bootstrap, r.output_topics(), PARTITIONS) as counter:
            m = await common.measure(
                start,
                counter,
                args.pipeline_n,
                log_path=r.log_path,
                stop=_keep if r.service else _stop_bare,
                watch=watch,
            )
        if r.service:
            lat = await latency.measure(
                bootstrap,
                [r.request_topic(LAT_PARTNER)],
                r.output_topics(LAT_PARTNER),
                out_partitions=PARTITIONS,
                rate=args.pipeline_latency_rate,
                seconds=args.pipeline_latency_s,
                seed=args.pipeline_seed + 1000 + r.round,
                prefix=f"{r.tag}-lat",
            )
    finally:
        if r.service and procs:
            code = await asyncio.to_thread(common.terminate, procs[0], 60)
    if r.service:
        if code != 0:  # a clean exit on SIGTERM is part of the service's contract
            raise RuntimeError(f"the service exited {code}:\n{common.tail(r.log_path)}")
        assert lat is not None
        if lat.answered < lat.sent:
            raise RuntimeError(f"{lat.sent - lat.answered} of {lat.sent} paced requests got no outcome")
    elif m.exit_code != 0:
        log(f"warning: bare exited {m.exit_code} after its outcomes (measurement kept)")
    return Result(r, m, lat, load_avg)


def _watched_ms_per_msg(m: Measurement) -> dict[str, float]:
    return {k: 1000 * v / max(1, m.steady_msgs) for k, v in m.watched.items()}


def _describe(res: Result) -> str:
    m = res.m
    others = ", ".join(f"{k} {v:.3f}" for k, v in _watched_ms_per_msg(m).items())
    text = (
        f"{m.msgs_per_s:7.0f} msg/s, {m.cpu_ms_per_msg:.3f} ms CPU/msg (steady: {m.steady_msgs} msgs "
        f"in {m.steady_s:.2f}s; {m.from_spawn_s:.2f}s from spawn; ms CPU/msg of {others or '-'})"
    )
    if res.lat is not None:
        s = res.lat.summary()
        text += f"; latency p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms ({s['answered']}/{s['sent']})"
    return text


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _r(x: float, digits: int = 3) -> float:
    return round(x, digits)


ORDERS = (("bare", "eos", "off"), ("off", "eos", "bare"), ("bare", "off", "eos"), ("eos", "off", "bare"))
"""Run orders, round after round: eos and off back to back, each first in turn, bare before or after."""


def _plan(rounds: int) -> list[Run]:
    return [Run(c, r, common.tag(f"{c}{r}")) for r in range(rounds) for c in ORDERS[r % len(ORDERS)]]


def source_state() -> dict[str, Any]:
    """Which service code ran: HEAD and whether service/ had uncommitted changes."""

    def git(*a: str) -> str:
        out = subprocess.run(["git", *a], cwd=common.ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    dirty = git("status", "--porcelain", "--", "service")
    return {"commit": git("rev-parse", "--short", "HEAD"), "service_dirty": bool(dirty)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n: int = args.pipeline_n
    rounds: int = args.pipeline_rounds
    shutil.rmtree(FILES, ignore_errors=True)
    FILES.mkdir(parents=True)
    plan = _plan(rounds)
    results: list[Result] = []
    load_before = os.getloadavg()[0]
    with common.kafka() as bootstrap, Simulator(SIM_ARGS, name="pipeline/simulator") as sim:
        await common.create_topics(bootstrap, [t for r in plan for t in r.topics()], PARTITIONS)
        log(f"pre-producing {n} requests of the mix for each of {len(plan)} runs ...")
        mix: list[traffic.Mix] = []
        for r in plan:  # the same requests for every run (same seed), under the run's ids
            mix = await traffic.produce(bootstrap, r.request_topic(), n, r.tag, args.pipeline_seed)
        assert sim.proc is not None
        watch = {"simulator": sim.proc.pid}
        broker = common.broker_pid()
        if broker is not None:
            watch["broker"] = broker
        for r in plan:
            res = await _run_one(r, bootstrap, sim.url, args, watch)
            results.append(res)
            log(f"{r.contender:4s} round {r.round}: {_describe(res)}")
        stats = sim.stats()
    statuses = stats.get("status_counts") or {}
    non_ok = {k: v for k, v in statuses.items() if k != "200"}

    def of(c: str) -> list[Result]:
        return [x for x in results if x.run.contender == c]

    def med(c: str, attr: str) -> float:
        return _median([getattr(x.m, attr) for x in of(c)])

    def from_spawn(c: str) -> float:
        """Throughput counting start-up: N over the time from spawning the process to the N-th outcome."""
        return _median([n / x.m.from_spawn_s for x in of(c)])

    def lat_med(c: str, q: float) -> float:
        """The median over rounds of each round's percentile `q`."""
        return _median([percentile(x.lat.ms, q) for x in of(c) if x.lat is not None])

    def lat_pooled(c: str, q: float) -> float:
        return percentile([v for x in of(c) if x.lat is not None for v in x.lat.ms], q)

    def paired(attr: str) -> list[float]:
        """eos / off of each round (the two ran back to back, under about the same load)."""
        out = []
        for rnd in range(rounds):
            e = [getattr(x.m, attr) for x in of("eos") if x.run.round == rnd]
            o = [getattr(x.m, attr) for x in of("off") if x.run.round == rnd]
            if e and o:
                out.append(_r(e[0] / o[0]))
        return out

    tp = {c: med(c, "msgs_per_s") for c in CONTENDERS}
    cpu = {c: med(c, "cpu_ms_per_msg") for c in CONTENDERS}
    tp_ratio, cpu_ratio = tp["eos"] / tp["bare"], cpu["eos"] / cpu["bare"]
    eos_tp_ratio, eos_cpu_ratio = tp["eos"] / tp["off"], cpu["eos"] / cpu["off"]
    lat = {c: {q: lat_med(c, q) for q in (50, 99)} for c in ("eos", "off")}
    return {
        "bench": "pipeline",
        # exactly-once (the default) against at-least-once, medians over rounds
        "eos_msgs_per_s": _r(tp["eos"], 1),
        "off_msgs_per_s": _r(tp["off"], 1),
        "eos_vs_off_throughput_ratio": _r(eos_tp_ratio),
        "eos_cpu_ms_per_msg": _r(cpu["eos"], 4),
        "off_cpu_ms_per_msg": _r(cpu["off"], 4),
        "eos_vs_off_cpu_per_msg_ratio": _r(eos_cpu_ratio),
        "eos_vs_off_per_round": {"throughput": paired("msgs_per_s"), "cpu_per_msg": paired("cpu_ms_per_msg")},
        "eos_latency_p50_ms": _r(lat["eos"][50], 1),
        "eos_latency_p99_ms": _r(lat["eos"][99], 1),
        "off_latency_p50_ms": _r(lat["off"][50], 1),
        "off_latency_p99_ms": _r(lat["off"][99], 1),
        "eos_added_latency_p50_ms": _r(lat["eos"][50] - lat["off"][50], 1),
        "eos_added_latency_p99_ms": _r(lat["eos"][99] - lat["off"][99], 1),
        "latency_pooled_ms": {
            c: {"p50": _r(lat_pooled(c, 50), 1), "p99": _r(lat_pooled(c, 99), 1)} for c in ("eos", "off")
        },
        # the service (default settings: exactly-once) against the bare loop
        "throughput_ratio_vs_bare": _r(tp_ratio),
        "cpu_per_msg_ratio_vs_bare": _r(cpu_ratio),
        "bare_msgs_per_s": _r(tp["bare"], 1),
        "service_msgs_per_s": _r(tp["eos"], 1),
        "bare_cpu_ms_per_msg": _r(cpu["bare"], 4),
        "service_cpu_ms_per_msg": _r(cpu["eos"], 4),
        "msgs_per_s_from_spawn": {c: _r(from_spawn(c), 1) for c in CONTENDERS},
        "n": n,
        "rounds": rounds,
        "concurrency": args.pipeline_concurrency,
        "latency_load": {"rate_per_s": args.pipeline_latency_rate, "seconds": args.pipeline_latency_s},
        "targets": {
            "throughput_ratio_min": THROUGHPUT_RATIO_MIN,
            "cpu_per_msg_ratio_max": CPU_RATIO_MAX,
            "eos_vs_off_throughput_ratio_min": EOS_THROUGHPUT_RATIO_MIN,
        },
        "targets_met": {
            "throughput": tp_ratio >= THROUGHPUT_RATIO_MIN,
            "cpu_per_msg": cpu_ratio <= CPU_RATIO_MAX,
            "eos_throughput": eos_tp_ratio >= EOS_THROUGHPUT_RATIO_MIN,
            "all": tp_ratio >= THROUGHPUT_RATIO_MIN
            and cpu_ratio <= CPU_RATIO_MAX
            and eos_tp_ratio >= EOS_THROUGHPUT_RATIO_MIN,
        },
        "traffic": traffic.summarise(mix),
        "simulator": {"latency_s": 0, "limits": None, "faults": None, "non_200_answers": non_ok},
        "cpus": os.cpu_count(),
        "load_avg_1m": {"before": _r(load_before, 2), "after": _r(os.getloadavg()[0], 2)},
        "source": source_state(),
        "runs": [
            {
                "contender": x.run.contender,
                "round": x.run.round,
                "msgs_per_s": _r(x.m.msgs_per_s, 1),
                "cpu_ms_per_msg": _r(x.m.cpu_ms_per_msg, 4),
                "steady_msgs": x.m.steady_msgs,
                "steady_s": _r(x.m.steady_s),
                "from_spawn_s": _r(x.m.from_spawn_s),
                "load_avg_1m": _r(x.load_avg, 2),
                **{f"{k}_cpu_ms_per_msg": _r(v, 4) for k, v in _watched_ms_per_msg(x.m).items()},
                **({"latency": x.lat.summary()} if x.lat is not None else {}),
            }
            for x in results
        ],
    }
