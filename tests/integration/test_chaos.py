"""The chaos suite, short: `make chaos` runs the long versions (10,000 and 3,000 requests).

Each test is one run of the harness in bench/chaos (its own broker, Redis, simulator with 20%
faults, gateway replicas as processes) and asserts its verdict: every request has exactly one
outcome, and no request was billed twice without the `on_unknown: retry` policy explaining it
(in the rebalance run, none at all). The run's logs stay in the test's tmp_path (the failure
message names the dir).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.chaos import ChaosOptions, run_chaos

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
        requests=800,
        rate_per_s=40,
        seed=7,
        outcome_timeout_s=60,
        settle_s=3,
        run_dir=run_dir,
    )
    for name, value in overrides.items():
        setattr(options, name, value)
    return options


async def test_chaos_short_kills_a_broker_restart_and_scaling(tmp_path: Path) -> None:
    """800 requests over 20 s: 2 kill -9 (each restarted), a broker restart, 3 -> 4 -> 2 replicas."""
    result = await run_chaos(_short("chaos", tmp_path, max_kills=2, kill_every_s=(4.0, 7.0)))
    print(json.dumps(result))
    assert result["kills"] == 2
    assert result["broker_restarts"] == 1
    assert result["requests"] == 800
    verdict = {k: result[k] for k in ("lost", "duplicate_outcomes", "called_twice_unexplained")}
    assert verdict == {"lost": 0, "duplicate_outcomes": 0, "called_twice_unexplained": 0}, json.dumps(result)


async def test_rebalance_short_join_and_leave_call_nothing_twice(tmp_path: Path) -> None:
    """A backlog of 1,000 requests (about 25 s of work for 2 replicas), no crash: a third
    replica joins at 25% done, then one leaves gracefully at 60%."""
    result = await run_chaos(_short("rebalance", tmp_path, replicas=2, requests=1000))
    print(json.dumps(result))
    assert result["kills"] == 0
    assert result["requests"] == 1000
    verdict = {k: result[k] for k in ("lost", "duplicate_outcomes", "called_twice")}
    assert verdict == {"lost": 0, "duplicate_outcomes": 0, "called_twice": 0}, json.dumps(result)
