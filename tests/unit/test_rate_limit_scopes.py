"""Limits pooled per model class and 429s paused per scope (issue 10), with the real Scheduler
and LocalLimiter on virtual time.

ANTHROPIC.md: limits are per organisation, pooled per model family; the headers report the
most restrictive limit in effect (a workspace's can be lower than the org's); a 429 carries
`retry-after` in seconds.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest

from service.config.loader import parse_config
from service.config.settings import GatewaySettings, LimitSettings
from service.scheduling.pools import PauseScope
from service.scheduling.ratelimits import over_limit, scope_of_429
from service.scheduling.scheduler import Cost, Grant, Scheduler, Usage
from service.upstream.errors import parse_retry_after
from tests.support import vtime


def _settings(**extra: object) -> GatewaySettings:
    partners = [
        {"id": "haiku-app", "api_key": {"env": "X"}, "max_concurrency": 64},
        {"id": "opus-app", "api_key": {"env": "X"}, "max_concurrency": 64},
        {"id": "ws-a", "api_key": {"env": "X"}, "workspace": "team", "max_concurrency": 64},
        {"id": "ws-b", "api_key": {"env": "X"}, "workspace": "team", "max_concurrency": 64},
    ]
    return parse_config(
        {
            "org_limits": {"rpm": 600},
            "org_class_limits": {"haiku": {"rpm": 1200}, "opus": {"rpm": 60}},
            "runtime": {"max_in_flight": 10_000},
            "partners": partners,
            **extra,
        }
    )


def test_a_haiku_partner_is_not_held_back_by_opus_traffic() -> None:
    async def scenario() -> Counter[str]:
        loop = asyncio.get_running_loop()
        sched = Scheduler(_settings(), clock=loop.time)
        served: Counter[str] = Counter()

        async def worker(pid: str, model: str) -> None:
            cost = Cost(10, 10, sched.model_class(model))
            while loop.time() < 70:
                g = await sched.acquire(pid, cost)
                if 10 <= loop.time() < 70:
                    served[pid] += 1
                await asyncio.sleep(0.05)
                sched.release(g, Usage(10, 10))

        tasks = [asyncio.create_task(worker("haiku-app", "claude-haiku-4-5")) for _ in range(16)]
        tasks += [asyncio.create_task(worker("opus-app", "claude-opus-4-1")) for _ in range(16)]
        await asyncio.gather(*tasks)
        await sched.aclose()
        return served

    served = vtime.run(scenario())
    # each its whole class limit over the minute measured
    assert 0.97 * 1200 <= served["haiku-app"] <= 1201, served
    assert 0.97 * 60 <= served["opus-app"] <= 61, served


def _workspace_429() -> dict[str, str]:
    """What a key in a smaller workspace sees: the workspace's limit, nothing left."""
    return {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "retry-after": "30",
    }


def _org_429() -> dict[str, str]:
    return {
        "anthropic-ratelimit-requests-limit": "600",
        "anthropic-ratelimit-requests-remaining": "0",
        "retry-after": "7",
    }


def test_the_headers_tell_a_workspace_429_from_an_orgs() -> None:
    pool = LimitSettings(rpm=600, itpm=1_000_000)
    amounts = {"rpm": 1, "itpm": 2_000, "otpm": 100}
    assert scope_of_429(_workspace_429(), pool, amounts) == "key"
    assert scope_of_429(_org_429(), pool, amounts) == "org"
    tokens = {
        "anthropic-ratelimit-input-tokens-limit": "1000000",
        "anthropic-ratelimit-input-tokens-remaining": "1000",
    }
    assert scope_of_429(tokens, pool, amounts) == "org"  # 1,000 (rounded) cannot hold 2,000
    assert scope_of_429({}, pool, amounts) == "key"  # no evidence: never freeze everyone on a guess


def _tokens(dim: str, limit: int, remaining: int) -> dict[str, str]:
    return {
        f"anthropic-ratelimit-{dim}-tokens-limit": str(limit),
        f"anthropic-ratelimit-{dim}-tokens-remaining": str(remaining),
        "anthropic-ratelimit-requests-limit": "600",
        "anthropic-ratelimit-requests-remaining": "599",
    }


def test_a_429_for_a_request_bigger_than_a_limit_itself_is_told_from_an_empty_bucket() -> None:
    """ANTHROPIC.md: OTPM is counted from `max_tokens` when a request starts and the buckets
    refill only up to their limit, so a request needing more than the limit is refused at any
    time; pausing the pool for it would stop every partner and help nobody."""
    pool = LimitSettings(rpm=600, itpm=1_000_000, otpm=8_000)
    # max_tokens above the output limit: over, whatever the bucket holds now
    for remaining in (8_000, 3_000, 0):
        why = over_limit(_tokens("output", 8_000, remaining), pool, {"rpm": 1, "itpm": 50, "otpm": 16_000})
        assert why is not None
        assert "max_tokens (16000)" in why, why
        assert "(8000)" in why, why
    assert over_limit(_tokens("output", 8_000, 0), pool, {"rpm": 1, "itpm": 50, "otpm": 8_000}) is None
    # a workspace's own lower limit is named as such
    why = over_limit(_tokens("output", 4_000, 4_000), pool, {"rpm": 1, "itpm": 50, "otpm": 6_000})
    assert why is not None
    assert "workspace" in why
    # input: bigger than the limit, refused with the bucket full
    big = {"rpm": 1, "itpm": 1_300_000, "otpm": 100}
    why = over_limit(_tokens("input", 1_000_000, 1_000_000), pool, big)
    assert why is not None
    assert "estimated input (1300000)" in why
    # ...but not when the bucket was not full (the estimate runs high: a wait may let it in)
    assert over_limit(_tokens("input", 1_000_000, 400_000), pool, big) is None
    # ...nor when another dimension was short too
    rpm_short = {**_tokens("input", 1_000_000, 1_000_000), "anthropic-ratelimit-requests-remaining": "0"}
    assert over_limit(rpm_short, pool, big) is None
    # an ordinary 429 and one without headers
    assert over_limit(_tokens("input", 1_000_000, 1_000), pool, {"rpm": 1, "itpm": 2_000, "otpm": 9}) is None
    assert over_limit({}, pool, big) is None


async def _grant(sched: Scheduler, pid: str, model: str = "claude-sonnet-4-5") -> Grant:
    return await sched.acquire(pid, Cost(10, 10, sched.model_class(model)))


def test_a_workspace_429_pauses_that_workspace_only_and_at_most_max_pause() -> None:
    async def scenario() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        sched = Scheduler(_settings(rate_limits={"max_pause_s": 20}), clock=loop.time)
        g = await _grant(sched, "ws-a")
        sched.release(g, Usage(0, 0))
        scope, seconds = sched.rate_limited(g, _workspace_429(), parse_retry_after("30"))
        assert (scope, seconds) == (PauseScope("key", "workspace:team"), 20)
        waited: dict[str, float] = {}

        async def one(pid: str) -> None:
            asked = loop.time()
            sched.release(await _grant(sched, pid), Usage(10, 10))
            waited[pid] = loop.time() - asked

        await asyncio.gather(*(one(p) for p in ("ws-a", "ws-b", "haiku-app", "opus-app")))
        await sched.aclose()
        return waited

    waited = vtime.run(scenario())
    assert waited["ws-a"] == pytest.approx(20, abs=0.01)
    assert waited["ws-b"] == pytest.approx(20, abs=0.01)  # same workspace
    assert waited["haiku-app"] == 0
    assert waited["opus-app"] == 0


def test_an_org_429_pauses_only_its_model_class() -> None:
    async def scenario() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        sched = Scheduler(_settings(), clock=loop.time)
        g = await _grant(sched, "opus-app", "claude-opus-4-1")
        sched.release(g, Usage(0, 0))
        headers = {**_org_429(), "anthropic-ratelimit-requests-limit": "60"}
        scope, seconds = sched.rate_limited(g, headers, parse_retry_after(headers["retry-after"]))
        assert (scope, seconds) == (PauseScope("org", "opus"), 7)
        waited: dict[str, float] = {}

        async def one(pid: str, model: str) -> None:
            asked = loop.time()
            sched.release(await _grant(sched, pid, model), Usage(10, 10))
            waited[model] = loop.time() - asked

        await asyncio.gather(one("ws-a", "claude-opus-4-5"), one("ws-b", "claude-haiku-4-5"))
        await sched.aclose()
        return waited

    waited = vtime.run(scenario())
    assert waited["claude-opus-4-5"] == pytest.approx(7, abs=0.01)
    assert waited["claude-haiku-4-5"] == 0


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300", "86401", "-1", "soon", ""])
def test_infinite_or_absurd_retry_after_is_rejected(value: str) -> None:
    assert parse_retry_after(value) is None


def test_a_429_without_a_usable_retry_after_pauses_briefly() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        sched = Scheduler(_settings(), clock=loop.time)
        g = await _grant(sched, "ws-a")
        sched.release(g, Usage(0, 0))
        _, seconds = sched.rate_limited(
            g, {**_workspace_429(), "retry-after": "inf"}, parse_retry_after("inf")
        )
        await sched.aclose()
        return seconds

    assert vtime.run(scenario()) == 1.0
    assert math.isfinite(vtime.run(scenario()))
