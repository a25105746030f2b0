"""The gateway's overhead: the service against a bare consume -> Claude -> produce loop.

Both contenders run as processes against the same zero-latency simulator (a separate process,
no limits, no faults) and the same broker, each on its own backlog of N identical requests
pre-produced before any contender starts. They run alternately (bare, service, bare, service, ...)
and the medians are reported:

- throughput: outcomes per second between the contender's first visible outcome and its N-th
  (visible = acknowledged, counted from the output topics' end offsets);
- CPU per message: the contender's user + system CPU over the same window, divided by the
  outcomes in it (interpreter start-up, imports and the group join are excluded).

Targets (the issue): throughput ratio service/bare >= 0.8, CPU-per-message ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import common
from bench.common import BENCH_DIR, Measurement, OutcomeCounter, Simulator, log

FILES = BENCH_DIR / "pipeline"  # configs and logs of the last run

THROUGHPUT_RATIO_MIN = 0.8
CPU_RATIO_MAX = 1.3
PARTNER = "p0"
SIM_ARGS = [
    "--latency-s", "0", "--rpm", "0", "--itpm", "0", "--otpm", "0", "--count-tokens-rpm", "0",
    "--output-tokens", "32", "--seed", "1",
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("pipeline")
    g.add_argument("--pipeline-n", type=int, default=6000, help="requests per contender run")
    g.add_argument("--pipeline-rounds", type=int, default=3, help="runs of each contender (alternating)")
    g.add_argument("--pipeline-concurrency", type=int, default=64, help="Claude calls in flight, both")


@dataclass
class Run:
    contender: str  # "bare" or "service"
    round: int
    tag: str

    @property
    def request_topic(self) -> str:
        return f"{self.tag}.requests.{PARTNER}"

    @property
    def output_topics(self) -> list[str]:
        if self.contender == "bare":
            return [f"{self.tag}.answers"]
        return [f"{self.tag}.responses.{PARTNER}", f"{self.tag}.deadletter.{PARTNER}"]

    @property
    def log_path(self) -> Path:
        return FILES / f"{self.tag}.log"


def _service_config(run: Run, bootstrap: str, sim_url: str, concurrency: int) -> dict[str, Any]:
    key_file = FILES / "keys" / f"{PARTNER}.key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text("sk-ant-bench-service\n")
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"{run.tag}-gateway",
            "request_topic_prefix": f"{run.tag}.requests.",
            "response_topic_prefix": f"{run.tag}.responses.",
            "deadletter_topic_prefix": f"{run.tag}.deadletter.",
        },
        "anthropic": {"base_url": sim_url, "timeout_s": 30},
        "runtime": {"http_host": "127.0.0.1", "http_port": 0},
        "partners": [
            {"id": PARTNER, "max_concurrency": concurrency, "api_key": {"file": str(key_file)}},
        ],
    }


def _start(run: Run, bootstrap: str, sim_url: str, n: int, concurrency: int) -> subprocess.Popen[bytes]:
    if run.contender == "bare":
        cmd = [
            sys.executable, "-m", "bench.bare", "--bootstrap", bootstrap, "--topic", run.request_topic,
            "--out-topic", run.output_topics[0], "--sim-url", sim_url, "--n", str(n),
            "--group", f"{run.tag}-bare", "--concurrency", str(concurrency),
        ]  # fmt: skip
    else:
        config = FILES / f"{run.tag}.yaml"
        config.write_text(yaml.safe_dump(_service_config(run, bootstrap, sim_url, concurrency)))
        cmd = [sys.executable, "-m", "service", "run", "--config", str(config)]
    return common.spawn(cmd, run.log_path)


def _stop(contender: str) -> Callable[[subprocess.Popen[bytes]], int]:
    def stop(proc: subprocess.Popen[bytes]) -> int:
        if contender == "bare":  # it exits by itself after N records
            try:
                return int(proc.wait(timeout=30))
            except subprocess.TimeoutExpired:
                pass
        return common.terminate(proc, 60)

    return stop


def _watched_ms_per_msg(m: Measurement) -> dict[str, float]:
    return {k: 1000 * v / max(1, m.steady_msgs) for k, v in m.watched.items()}


def _describe(m: Measurement) -> str:
    others = ", ".join(f"{k} {v:.3f}" for k, v in _watched_ms_per_msg(m).items())
    return (
        f"{m.msgs_per_s:7.0f} msg/s, {m.cpu_ms_per_msg:.3f} ms CPU/msg (steady: {m.steady_msgs} msgs "
        f"in {m.steady_s:.2f}s; {m.from_spawn_s:.2f}s from spawn; ms CPU/msg of {others or '-'})"
    )


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _r(x: float, digits: int = 3) -> float:
    return round(x, digits)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n: int = args.pipeline_n
    rounds: int = args.pipeline_rounds
    concurrency: int = args.pipeline_concurrency
    shutil.rmtree(FILES, ignore_errors=True)
    FILES.mkdir(parents=True)
    plan = [Run(c, r, common.tag(f"{c}{r}")) for r in range(rounds) for c in ("bare", "service")]
    measured: list[tuple[Run, Measurement]] = []
    with common.kafka() as bootstrap, Simulator(SIM_ARGS, name="pipeline/simulator") as sim:
        await common.create_topics(bootstrap, [t for r in plan for t in (r.request_topic, *r.output_topics)])
        log(f"pre-producing {n} requests for each of {len(plan)} runs ...")
        for r in plan:
            await common.produce_requests(bootstrap, r.request_topic, n, prefix=r.tag)
        assert sim.proc is not None
        watch = {"simulator": sim.proc.pid}
        broker = common.broker_pid()
        if broker is not None:
            watch["broker"] = broker
        for r in plan:
            async with OutcomeCounter(bootstrap, r.output_topics) as counter:
                m = await common.measure(
                    functools.partial(_start, r, bootstrap, sim.url, n, concurrency),
                    counter,
                    n,
                    log_path=r.log_path,
                    stop=_stop(r.contender),
                    watch=watch,
                )
            if m.exit_code != 0:
                if r.contender == "service":  # a clean exit on SIGTERM is part of the service's contract
                    raise RuntimeError(f"the service exited {m.exit_code}:\n{common.tail(r.log_path)}")
                log(f"warning: bare exited {m.exit_code} after its {n} outcomes (measurement kept)")
            measured.append((r, m))
            log(f"{r.contender:7s} round {r.round}: {_describe(m)}")
        stats = sim.stats()
    statuses = stats.get("status_counts") or {}
    non_ok = {k: v for k, v in statuses.items() if k != "200"}

    def med(contender: str, attr: str) -> float:
        return _median([getattr(m, attr) for r, m in measured if r.contender == contender])

    def from_spawn(contender: str) -> float:
        """Throughput counting start-up: N over the time from spawning the process to the N-th outcome."""
        return _median([n / m.from_spawn_s for r, m in measured if r.contender == contender])

    bare_tp, service_tp = med("bare", "msgs_per_s"), med("service", "msgs_per_s")
    bare_cpu, service_cpu = med("bare", "cpu_ms_per_msg"), med("service", "cpu_ms_per_msg")
    tp_ratio = service_tp / bare_tp
    cpu_ratio = service_cpu / bare_cpu
    return {
        "bench": "pipeline",
        "throughput_ratio_vs_bare": _r(tp_ratio),
        "cpu_per_msg_ratio_vs_bare": _r(cpu_ratio),
        "bare_msgs_per_s": _r(bare_tp, 1),
        "service_msgs_per_s": _r(service_tp, 1),
        "bare_cpu_ms_per_msg": _r(bare_cpu, 4),
        "service_cpu_ms_per_msg": _r(service_cpu, 4),
        "bare_msgs_per_s_from_spawn": _r(from_spawn("bare"), 1),
        "service_msgs_per_s_from_spawn": _r(from_spawn("service"), 1),
        "n": n,
        "rounds": rounds,
        "concurrency": concurrency,
        "targets": {"throughput_ratio_min": THROUGHPUT_RATIO_MIN, "cpu_per_msg_ratio_max": CPU_RATIO_MAX},
        "targets_met": {
            "throughput": tp_ratio >= THROUGHPUT_RATIO_MIN,
            "cpu_per_msg": cpu_ratio <= CPU_RATIO_MAX,
            "all": tp_ratio >= THROUGHPUT_RATIO_MIN and cpu_ratio <= CPU_RATIO_MAX,
        },
        "simulator": {"latency_s": 0, "limits": None, "faults": None, "non_200_answers": non_ok},
        "cpus": os.cpu_count(),
        "runs": [
            {
                "contender": r.contender,
                "round": r.round,
                "msgs_per_s": _r(m.msgs_per_s, 1),
                "cpu_ms_per_msg": _r(m.cpu_ms_per_msg, 4),
                "steady_msgs": m.steady_msgs,
                "steady_s": _r(m.steady_s),
                "from_spawn_s": _r(m.from_spawn_s),
                "cpu_total_s": _r(m.cpu_total_s),
                **{f"{k}_cpu_ms_per_msg": _r(v, 4) for k, v in _watched_ms_per_msg(m).items()},
            }
            for r, m in measured
        ],
    }
