"""The knobs of a chaos run, with the defaults `make chaos` uses, and their command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Mode = Literal["chaos", "rebalance"]

#: The simulator's injected faults, 20% of the calls in all: answered 500 or 529 at once
#: (nothing billed), or a connection dropped after the work (billed, no answer).
FAULTS = {"api_error_rate": 0.07, "overloaded_rate": 0.07, "drop_rate": 0.06}

#: The simulator's faults in Message Batch entries, 12% of them: `errored` with `api_error` or
#: `overloaded_error` (the gateway puts them in a new batch, or in real time after the last
#: submission), or left to expire (the batch then ends at its expiry; real time takes over).
BATCH_FAULTS = {"api_error_rate": 0.04, "overloaded_rate": 0.03, "expire_rate": 0.05}

#: The batch worker's failpoints (service/batches/): after an intent is recorded and before
#: its batch is created; after a create and before its id is recorded; after a transaction
#: of results (`results_chunk` of them) and before the next. A start is armed with one, to
#: end at its 1st to 4th passage.
BATCH_FAILPOINTS = ("batch.intent", "batch.created", "batch.settled", "batch.published")


@dataclass
class ChaosOptions:
    """One run. `mode="chaos"`: requests at a steady `rate_per_s`; over that time, kill -9 of a
    random replica every `kill_every_s` (each restarted after `restart_delay_s`),
    `broker_restarts` broker restarts with the data kept, a scale from `replicas` to
    `scale_up_to` (at 30%) and down to `scale_down_to` (at 70%). `mode="rebalance"`: every
    request produced at once (a backlog, as when an autoscaler scales out), no crash at all; a
    replica joins when 25% of the requests have an outcome, and once it is ready and 60% have
    one, a replica leaves gracefully (then `called_twice` must be 0 too).

    `batch_share` of the requests can wait (`service_class: batch`, or `auto` with a deadline
    two hours away): the gateways run with `batches.enabled` and short timings, the
    simulator's batches take `batch_processing_s` (a uniform draw), `batch_worker_kills` of
    the kills aim at the replica that holds open batches (the batch worker), and
    `batch_failpoints` of the replica starts end at a step of the batch worker."""

    mode: Mode = "chaos"
    requests: int = 10_000
    rate_per_s: float = 80.0
    """Chaos mode only; the rebalance mode produces everything at once."""
    max_concurrency: int | None = None
    """Per partner and replica; default 32 (chaos), 8 (rebalance: the backlog takes a while)."""
    seed: int = 1
    replicas: int = 3
    scale_up_to: int = 4
    scale_down_to: int = 2
    kill_every_s: tuple[float, float] = (3.0, 7.0)
    max_kills: int | None = None
    restart_delay_s: float = 1.0
    broker_restarts: int = 1
    redis_wipes: int = 1
    """FLUSHALL of Redis at 40% (then 45%, ...), as a Redis restarted without persistence: the
    replicas must notice (`redis_losses_found`) and go on (chaos mode only)."""
    fault_scale: float = 1.0
    """Multiplies `FAULTS` (1.0 = 20% of the calls fail on purpose)."""
    partitions: int = 3
    outcome_timeout_s: float = 300.0
    """After the chaos stops, how long to wait for every request to have an outcome."""
    settle_s: float = 5.0
    """Then how long to keep reading before the gateways stop (late duplicates)."""
    session_timeout_ms: int = 10_000
    sim_latency_median_s: float | None = None
    """The simulator's median latency; default 0.2 s (chaos), 1.0 s (rebalance: calls in flight
    at the join and the leave)."""
    run_dir: Path | None = None
    keep_broker_data: bool = False
    batch_share: float | None = None
    """Share of the requests sent to the batch path; default 0.25 (chaos), 0 (rebalance);
    0 turns `batches.enabled` off."""
    batch_processing_s: tuple[float, float] = (2.0, 6.0)
    """A simulated Message Batch takes between these (drawn uniformly per batch)."""
    batch_expiry_s: float = 10.0
    """Its expiry (Anthropic's 24 h): entries left to expire end `expired` then."""
    batch_worker_kills: float = 0.5
    """With batches on, this share of the kills aims at the batch worker when one has open batches."""
    batch_failpoints: float = 0.5
    """With batches on, this share of the replica starts during the chaos is armed with one of
    `BATCH_FAILPOINTS` (a step of the batch worker where the process ends as if killed)."""

    @property
    def faults(self) -> dict[str, float]:
        return {name: rate * self.fault_scale for name, rate in FAULTS.items()}

    @property
    def duration_s(self) -> float:
        """How long producing takes; the chaos timeline is laid over it."""
        return self.requests / self.rate_per_s if self.mode == "chaos" else 0.0

    @property
    def latency_median_s(self) -> float:
        if self.sim_latency_median_s is not None:
            return self.sim_latency_median_s
        return 0.2 if self.mode == "chaos" else 1.0

    @property
    def effective_batch_share(self) -> float:
        """The share of batch traffic in effect (see `batch_share`)."""
        if self.batch_share is not None:
            return self.batch_share
        return 0.25 if self.mode == "chaos" else 0.0

    @property
    def batch_faults(self) -> dict[str, float]:
        return {name: rate * self.fault_scale for name, rate in BATCH_FAULTS.items()}

    @property
    def concurrency(self) -> int:
        if self.max_concurrency is not None:
            return self.max_concurrency
        return 32 if self.mode == "chaos" else 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ChaosOptions()
    parser.add_argument("--mode", choices=("chaos", "rebalance"), default=d.mode)
    parser.add_argument(
        "--requests", type=int, help="requests in all (default: 10000 for chaos, 3000 for rebalance)"
    )
    parser.add_argument(
        "--rate", type=float, default=d.rate_per_s, help="requests produced per second (chaos mode)"
    )
    parser.add_argument("--max-concurrency", type=int, help="per partner and replica (default 32 / 8)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the traffic and of the chaos")
    parser.add_argument("--replicas", type=int, default=d.replicas, help="gateway replicas at the start")
    parser.add_argument("--scale-up-to", type=int, default=d.scale_up_to)
    parser.add_argument("--scale-down-to", type=int, default=d.scale_down_to)
    parser.add_argument(
        "--kill-every",
        type=float,
        nargs=2,
        metavar=("MIN_S", "MAX_S"),
        default=d.kill_every_s,
        help="seconds between kills, drawn uniformly",
    )
    parser.add_argument("--max-kills", type=int, help="stop killing after this many")
    parser.add_argument("--restart-delay", type=float, default=d.restart_delay_s)
    parser.add_argument("--broker-restarts", type=int, default=d.broker_restarts)
    parser.add_argument(
        "--redis-wipes", type=int, default=d.redis_wipes, help="FLUSHALLs of Redis (a restart without data)"
    )
    parser.add_argument("--fault-scale", type=float, default=d.fault_scale, help="1.0 = 20%% faults")
    parser.add_argument("--partitions", type=int, default=d.partitions, help="per topic")
    parser.add_argument("--outcome-timeout", type=float, default=d.outcome_timeout_s)
    parser.add_argument("--settle", type=float, default=d.settle_s)
    parser.add_argument("--session-timeout-ms", type=int, default=d.session_timeout_ms)
    parser.add_argument("--sim-latency-median", type=float, help="seconds (default 0.2 / 1.0)")
    parser.add_argument("--run-dir", type=Path, help="default: .run/chaos/<time>-<mode>-seed<seed>")
    parser.add_argument("--keep-broker-data", action="store_true", help="keep the broker's data at the end")
    parser.add_argument(
        "--batch-share",
        type=float,
        help="share of the requests that can wait (batch path); default 0.25 (chaos), 0 (rebalance); "
        "0 turns batches off",
    )
    parser.add_argument(
        "--batch-processing",
        type=float,
        nargs=2,
        metavar=("MIN_S", "MAX_S"),
        default=d.batch_processing_s,
        help="a simulated batch's processing time, drawn uniformly",
    )
    parser.add_argument("--batch-expiry", type=float, default=d.batch_expiry_s, help="a batch's expiry, s")
    parser.add_argument(
        "--batch-worker-kills",
        type=float,
        default=d.batch_worker_kills,
        help="share of the kills aimed at the batch worker (with batches on)",
    )
    parser.add_argument(
        "--batch-failpoints",
        type=float,
        default=d.batch_failpoints,
        help="share of the replica starts armed with a batch-worker failpoint (with batches on)",
    )


def from_args(args: argparse.Namespace) -> ChaosOptions:
    requests = args.requests if args.requests is not None else (10_000 if args.mode == "chaos" else 3_000)
    return ChaosOptions(
        mode=args.mode,
        requests=requests,
        rate_per_s=args.rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        replicas=args.replicas,
        scale_up_to=args.scale_up_to,
        scale_down_to=args.scale_down_to,
        kill_every_s=(args.kill_every[0], args.kill_every[1]),
        max_kills=args.max_kills,
        restart_delay_s=args.restart_delay,
        broker_restarts=args.broker_restarts,
        redis_wipes=args.redis_wipes,
        fault_scale=args.fault_scale,
        partitions=args.partitions,
        outcome_timeout_s=args.outcome_timeout,
        settle_s=args.settle,
        session_timeout_ms=args.session_timeout_ms,
        sim_latency_median_s=args.sim_latency_median,
        run_dir=args.run_dir,
        keep_broker_data=args.keep_broker_data,
        batch_share=args.batch_share,
        batch_processing_s=(args.batch_processing[0], args.batch_processing[1]),
        batch_expiry_s=args.batch_expiry,
        batch_worker_kills=args.batch_worker_kills,
        batch_failpoints=args.batch_failpoints,
    )
