"""The chaos suite, short: `make chaos` runs the long versions (10,000 and 3,000 requests).

Each run test is one run of the harness in bench/chaos (its own broker, Redis, simulator with
20% faults, gateway replicas as processes; requests with images, PDFs, tools, trace context and
headers of every kind, see bench/chaos/traffic.py) and asserts its verdict: every request has
exactly one outcome, carrying the trace id its request sent, and no request was billed twice
without the `on_unknown: retry` policy explaining it (in the rebalance run, none at all). In
the chaos run a quarter of the requests go to Message Batches, and the kills aim at the batch
worker while it has batches open: no batch request is lost, answered twice, or billed twice
(in two batches, or in a batch and in real time). The run's logs stay in the test's tmp_path
(the failure message names the dir).
The last test feeds the verifier made-up counts: each way of failing is counted as one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.chaos import ChaosOptions, passed, run_chaos
from bench.chaos.replicas import Replica, State, WorkerWatch
from bench.chaos.traffic import Request
from bench.chaos.verify import Outcome, Tally, summarise
from service.batches.routing import custom_id

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("java") is None or shutil.which("redis-server") is None,
        reason="needs java (local Kafka) and redis-server",
    ),
]


def _short(mode: str, run_dir: Path, **overrides: object) -> ChaosOptions:
    options = ChaosOptions(
        mode="chaos" if mode == "chaos" else "rebalance",
        requests=600,
        rate_per_s=40,
        seed=7,
        outcome_timeout_s=60,
        settle_s=3,
        session_timeout_ms=6_000,  # Kafka's least by default: a killed replica's partitions move on sooner
        run_dir=run_dir,
    )
    for name, value in overrides.items():
        setattr(options, name, value)
    return options


async def test_chaos_short_kills_a_broker_restart_and_scaling(tmp_path: Path) -> None:
    """600 requests over 15 s, a quarter of them for Message Batches (which take 1-3 s,
    12% of their entries errored or expired): 2 kill -9 (each restarted), aimed at the
    batch worker when there is one, half the replica starts armed with a batch-worker
    failpoint, a broker restart, Redis emptied (FLUSHALL), 3 -> 4 -> 2 replicas."""
    options = _short(
        "chaos",
        tmp_path,
        # The broker's restart (SIGTERM) may skip the markers of a transaction committing then
        # (service/ingest/hanging.py). A new owner ends such a hang in its offsets within 10 s;
        # one left only in a response or dead-letter partition is ended by the writer holding it
        # 10-15 s after the broker is back, or else once stuck past the transaction timeout
        # (60 s) and two reads (5 s apart). 60 s for the outcomes failed a fresh-clone CI run when
        # only that last rule was there (claude.deadletter.alpha[2] still behind such a hang).
        outcome_timeout_s=120,
        max_kills=2,
        kill_every_s=(4.0, 7.0),
        batch_processing_s=(1.0, 3.0),
        batch_expiry_s=5.0,
        batch_worker_kills=1.0,
    )
    result = await run_chaos(options)
    print(json.dumps(result))
    assert result["kills"] == 2
    assert result["broker_restarts"] == 1
    assert result["redis_wipes"] == 1
    assert result["redis_losses_found"] >= 1, "no replica noticed that redis lost its data"
    assert result["requests"] == 600
    verdict = {
        k: result[k] for k in ("lost", "duplicate_outcomes", "called_twice_unexplained", "trace_context_lost")
    }
    assert verdict == dict.fromkeys(verdict, 0), json.dumps(result)
    assert result["traced_requests"] > 0, json.dumps(result)
    assert 100 <= result["batch_requests"] <= 200, result["batch_requests"]
    assert result["batches_created"] > 0, json.dumps(result)
    # the batch worker died mid-batch: a kill aimed at it, or a failpoint (between an intent and
    # its create, a create and its record, two transactions of results)
    at_failpoints = sum(result["failpoint_exits"].values())
    assert result["kills_of_batch_worker"] + at_failpoints >= 1, json.dumps(result)
    assert result["kills_with_batches_in_progress"] + at_failpoints >= 1, json.dumps(result)
    batch = {
        k: result[k]
        for k in ("batch_lost", "batch_duplicated", "batch_billed_twice_unexplained", "realtime_in_a_batch")
    }
    assert batch == dict.fromkeys(batch, 0), json.dumps(result)
    assert result["batch_served"] > 0, json.dumps(result)
    assert result["passed"], json.dumps(result)


async def test_rebalance_short_join_and_leave_call_nothing_twice(tmp_path: Path) -> None:
    """A backlog of 700 requests (about 18 s of work for 2 replicas), no crash: a third
    replica joins at 25% done, then one leaves gracefully at 60%."""
    result = await run_chaos(_short("rebalance", tmp_path, replicas=2, requests=700))
    print(json.dumps(result))
    assert result["kills"] == 0
    assert result["requests"] == 700
    verdict = {k: result[k] for k in ("lost", "duplicate_outcomes", "called_twice", "trace_context_lost")}
    assert verdict == dict.fromkeys(verdict, 0), json.dumps(result)
    assert result["traced_requests"] > 0, json.dumps(result)


def test_the_verifier_counts_every_way_a_batch_request_can_fail() -> None:
    """Made-up outcomes and calls: each batch request below fails one way, and only the
    real-time retry the `on_unknown: retry` policy pays for is explained."""

    def req(partner: str, rid: str, urgency: str = "batch") -> Request:
        return Request(partner, rid, b"{}", urgency)

    ok = {"ok": 1, "billed": 1, "all": 1}
    batch_ok = Outcome("response", None, False, "batch")
    realtime_ok = Outcome("response", None, False)
    cases = {  # request -> (outcomes, real-time calls, batch entries)
        req("alpha", "fine"): ([batch_ok], None, ok),
        req("alpha", "lost"): ([], None, ok),
        req("alpha", "twice"): ([batch_ok, batch_ok], None, ok),
        req("alpha", "two-batches"): ([batch_ok], None, {"ok": 2, "billed": 2, "all": 2}),
        req("bravo", "batch-and-realtime"): ([realtime_ok], ok, ok),
        req("charlie", "retry-and-batch"): ([Outcome("response", None, True)], ok, ok),
        req("charlie", "realtime-retried"): (
            [Outcome("response", None, True)],
            {"ok": 1, "billed": 2, "all": 3},
            {"ok": 0, "billed": 0, "all": 1},
        ),
        req("bravo", "realtime-in-batch", "realtime"): ([realtime_ok], ok, {"ok": 0, "billed": 0, "all": 1}),
    }
    tally = Tally()
    calls: dict[str, dict[str, int]] = {}
    batch_calls: dict[str, dict[str, int]] = {}
    for r, (outcomes, rt, entries) in cases.items():
        if outcomes:
            tally.by_request[r.request_id] = outcomes
        if rt is not None:
            calls[r.key] = rt
        batch_calls[custom_id(r.partner, r.request_id)] = entries
    killed = "vm-4200-a1b2c3"  # the claims' owner, killed with -9
    extra_call_lost = {
        "request_id": "lost-twice",
        "reason": "outcome_unknown",
        "claim": {"attempts": 2, "owner": killed},
    }
    tally.add("deadletter", json.dumps(extra_call_lost).encode())
    once = {**extra_call_lost, "request_id": "lost-once", "claim": {"attempts": 1, "owner": killed}}
    tally.add("deadletter", json.dumps(once).encode())
    for rid in ("lost-twice", "lost-once"):
        calls[f"charlie:{rid}"] = {"ok": 2, "billed": 2, "all": 2}
    cases[req("charlie", "lost-twice", "realtime")] = ([], None, {})
    cases[req("charlie", "lost-once", "realtime")] = ([], None, {})
    figures = summarise(list(cases), tally, calls, {"charlie"}, batch_calls, {4200})
    assert (figures["outcome_unknown"], figures["outcome_unknown_unexplained"]) == (2, 0)
    assert figures["batch_requests"] == 7
    assert (figures["batch_lost"], figures["batch_duplicated"]) == (1, 1)
    assert figures["batch_in_two_batches"] == 1
    assert figures["batch_and_realtime"] == 2
    assert figures["batch_billed_twice"] == 4  # two batches, batch + real time (twice), retried
    assert figures["batch_billed_twice_unexplained"] == 3  # all but the real-time retry
    assert figures["realtime_in_a_batch"] == 1
    # ok twice, a batch entry among them (3), or after one lost call only (1): not the extra
    # call the on_unknown: retry policy pays after two lost owners ("lost-twice")
    assert figures["called_twice_unexplained"] == 4
    assert figures["called_twice"] == 5
    assert (figures["batch_served"], figures["batch_served_in_realtime"]) == (4, 3)
    assert [e["request_id"] for e in figures["failures"]["batch_billed_twice_unexplained"]] == [
        "two-batches",
        "batch-and-realtime",
        "retry-and-batch",
    ]
    assert set(figures["failures"]) == {
        "lost",
        "duplicate_outcomes",
        "called_twice_unexplained",
        "batch_billed_twice_unexplained",
        "realtime_in_a_batch",
    }
    clean = {"lost": 0, "duplicate_outcomes": 0, "called_twice_unexplained": 0, "called_twice": 0}
    good = {"mode": "chaos", "requests": 1, "batch_share": 0.25, "batch_requests": 1, "batches_created": 1}
    good |= clean | {"batch_billed_twice": 0, "batch_billed_twice_unexplained": 0, "realtime_in_a_batch": 0}
    assert passed(good)
    assert not passed(good | {"batch_billed_twice_unexplained": 1})
    assert not passed(good | {"realtime_in_a_batch": 1})
    assert not passed(good | {"batches_created": 0}), "batch traffic that made no batch tested nothing"
    assert not passed(good | {"mode": "rebalance", "batch_billed_twice": 1})


def test_the_verifier_explains_an_unknown_outcome_only_by_a_dropped_call_or_a_lost_process() -> None:
    """`outcome_unknown_unexplained`: an `outcome_unknown` dead letter with neither a
    connection the simulator dropped after the work nor a claim by a process that did not
    stop gracefully; it fails a rebalance run (where CI found five), not a chaos run."""
    live, killed = 4100, 4200
    cases = {  # request id -> (claim owner, real-time calls)
        "dropped": (f"vm-{live}-a1b2c3", {"ok": 0, "billed": 1, "all": 1}),
        "owner-killed": (f"vm-{killed}-a1b2c3", {"ok": 1, "billed": 1, "all": 1}),
        "handed-off": (f"vm-{live}-a1b2c3", {"ok": 1, "billed": 1, "all": 1}),
        "owner-unreadable": ("replica", {"ok": 1, "billed": 1, "all": 1}),
    }
    tally = Tally()
    calls: dict[str, dict[str, int]] = {}
    requests = []
    for rid, (owner, rt) in cases.items():
        dead_letter = {
            "request_id": rid,
            "reason": "outcome_unknown",
            "claim": {"attempts": 1, "owner": owner},
        }
        tally.add("deadletter", json.dumps(dead_letter).encode())
        requests.append(Request("alpha", rid, b"{}", "realtime"))
        calls[f"alpha:{rid}"] = rt
    figures = summarise(requests, tally, calls, set(), {}, {killed})
    assert (figures["outcome_unknown"], figures["outcome_unknown_unexplained"]) == (4, 2)
    assert [e["request_id"] for e in figures["failures"]["outcome_unknown_unexplained"]] == [
        "handed-off",
        "owner-unreadable",
    ]
    clean = {"lost": 0, "duplicate_outcomes": 0, "called_twice_unexplained": 0, "called_twice": 0}
    rebalance = clean | {"mode": "rebalance", "requests": 4, "outcome_unknown_unexplained": 0}
    assert passed(rebalance)
    assert not passed(rebalance | {"outcome_unknown_unexplained": 2})
    assert passed(rebalance | {"mode": "chaos", "outcome_unknown_unexplained": 2}), "reported, not judged"
    # a graceful stop whose drain left claimed calls unpublished (exit 75) fails a rebalance run
    assert not passed(rebalance | {"stops_leaving_calls": 1})
    assert passed(rebalance | {"mode": "chaos", "stops_leaving_calls": 1})


def test_the_batch_worker_is_the_last_running_replica_that_took_the_pending_partition(
    tmp_path: Path,
) -> None:
    def started(ts: str) -> str:
        return f'{{"ts":"{ts}","level":"info","event":"batch worker started","open_batches":3}}\n'

    replicas = []
    for i in range(3):
        replica = Replica(i, tmp_path / f"{i}.yaml", tmp_path / f"gateway-{i}.log", 0)
        replica.proc = subprocess.Popen(["sleep", "60"])
        replica.state = State.RUNNING
        replica.log_path.write_text("=== chaos harness: start #1 of gateway\n")
        replicas.append(replica)
    watch = WorkerWatch()
    try:
        assert watch.worker(replicas) is None
        with replicas[1].log_path.open("a") as f:
            f.write(started("2026-12-01T10:00:01.000Z"))
        with replicas[2].log_path.open("a") as f:
            f.write(started("2026-12-01T10:00:05.000Z") + '{"ts":"2026-12-01T10:00:06')  # a line half written
        assert watch.worker(replicas) == 2
        with replicas[2].log_path.open("a") as f:  # killed and started again: not the worker now
            f.write('.000Z"}\n=== chaos harness: start #2 of gateway\n')
        assert watch.worker(replicas) is None, "gateway-1 lost the partition to gateway-2 before"
        with replicas[1].log_path.open("a") as f:
            f.write(started("2026-12-01T10:00:07.000Z"))
        assert watch.worker(replicas) == 1
        with replicas[0].log_path.open("a") as f:
            f.write(started("2026-12-01T10:00:09.000Z"))
        gone = replicas[0].proc
        assert gone is not None
        gone.kill()
        gone.wait()
        assert watch.worker(replicas) is None, "the last worker is gone and nobody took over yet"
    finally:
        for replica in replicas:
            assert replica.proc is not None
            replica.proc.kill()
            replica.proc.wait()
