"""Fair shares hold for any request sizes: property tests over random mixes of costs, weights,
config orders and arrivals, with the real `Scheduler` and `LocalLimiter` on virtual time
(tests/support/vtime.py: minutes of token-bucket behaviour in milliseconds).

Each busy partner keeps requests waiting; each request reserves its estimate and
`max_tokens`, and uses less (input estimates over-count, output stops early). The share
a partner gets is measured on what it used, on its dominant dimension (the one where it
uses the largest part of the org's limit: requests, input or output tokens); with one
binding resource, that is each partner's share of it. The properties (issue 10):

- equal weights give equal shares whatever the sizes and whatever the config order;
- weights are followed;
- the binding resource is used fully by one busy partner alone (work conservation);
- a quiet partner that arrives is served as soon as its own request fits, however large
  the flood's requests.

Before the fix, a request costing more than one second of the org budget was charged one
second, so partners sending large requests took most of the budget (80% for 8192 against
512 tokens), depending on the order of the config.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.config.loader import parse_config
from service.config.settings import GatewaySettings
from service.scheduling.scheduler import Cost, Scheduler, Usage
from tests.support import vtime

LATENCY_S = 0.05
BACKLOG = 256
"""Requests each busy partner keeps asked for: never capped by its own concurrency, even when
a large request of another held the pool and the tokens saved meanwhile go out at once."""
WARMUP_S = 90.0
"""Not measured: the start. The first partner's requests may be queued before the others' and
take a full bucket (a minute's worth of requests) at once; the others then catch up at the
refill rate, for up to a minute. With 10 s, a catch-up still running at rpm 331 counted 94
more turns for one of two equal partners (5.5%): the run's totals were even, the window not."""
WINDOW_S = 600.0
"""Long enough that one request of 8192 tokens is under 1% of what is measured."""


@dataclass(frozen=True)
class Shape:
    """One partner's requests: what it reserves and what it really uses."""

    est_input: int
    max_tokens: int
    input_used: float
    """Share of the estimate billed (the estimate is conservative)."""
    output_used: float
    """Share of max_tokens generated."""


@dataclass(frozen=True)
class Org:
    rpm: int
    itpm: int
    otpm: int


def _settings(weights: Sequence[tuple[str, float]], org: Org) -> GatewaySettings:
    return parse_config(
        {
            "org_limits": {"rpm": org.rpm, "itpm": org.itpm, "otpm": org.otpm},
            "runtime": {"max_in_flight": 100_000},
            "partners": [
                {"id": p, "weight": w, "max_concurrency": BACKLOG, "api_key": {"env": "X"}}
                for p, w in weights
            ],
        }
    )


async def _run(
    weights: Sequence[tuple[str, float]],
    shapes: dict[str, Shape],
    org: Org,
    busy: Sequence[str] | None = None,
) -> dict[str, tuple[float, float, float]]:
    """Saturate with the `busy` partners (all by default); used (requests, input, output) per
    partner over the measurement window."""
    loop = asyncio.get_running_loop()
    sched = Scheduler(_settings(weights, org), clock=loop.time)
    used = {p: [0.0, 0.0, 0.0] for p, _ in weights}
    end = WARMUP_S + WINDOW_S

    async def worker(pid: str) -> None:
        shape = shapes[pid]
        while loop.time() < end:
            grant = await sched.acquire(pid, Cost(shape.est_input, shape.max_tokens))
            started = loop.time()
            await asyncio.sleep(LATENCY_S)
            usage = Usage(int(shape.est_input * shape.input_used), int(shape.max_tokens * shape.output_used))
            sched.release(grant, usage)
            if WARMUP_S <= started < end:
                u = used[pid]
                u[0] += 1
                u[1] += usage.input_tokens
                u[2] += usage.output_tokens

    busy = busy or [p for p, _ in weights]
    tasks = [asyncio.create_task(worker(p)) for p in busy for _ in range(BACKLOG)]
    await asyncio.gather(*tasks)
    await sched.aclose()
    return {p: (u[0], u[1], u[2]) for p, u in used.items()}


def _dominant(used: tuple[float, float, float], org: Org) -> float:
    """The largest part of the org's limits used over the window, in minutes' worth."""
    minutes = WINDOW_S / 60
    return max(used[0] / org.rpm, used[1] / org.itpm, used[2] / org.otpm) / minutes


def _grain(shape: Shape, org: Org) -> float:
    """One request's dominant use, in the units of `_dominant`: a share measured over a window
    is only as exact as the requests that straddle its ends."""
    one = max(
        1 / org.rpm,
        shape.est_input * shape.input_used / org.itpm,
        shape.max_tokens * shape.output_used / org.otpm,
    )
    return one / (WINDOW_S / 60)


def _assert_fair(per_weight: dict[str, float], grain: dict[str, float]) -> None:
    """Shares per weight equal within 5%, give or take two requests at each window end."""
    top = max(per_weight.values())
    for p, x in per_weight.items():
        for q, y in per_weight.items():
            assert abs(x - y) <= 0.05 * top + 2 * (grain[p] + grain[q]), (p, q, per_weight, grain)


shapes = st.builds(
    Shape,
    est_input=st.integers(min_value=10, max_value=30_000),
    max_tokens=st.integers(min_value=16, max_value=8_192),
    input_used=st.floats(min_value=0.6, max_value=1.0),
    output_used=st.floats(min_value=0.2, max_value=1.0),
)
orgs = st.builds(
    Org,
    rpm=st.integers(min_value=60, max_value=1_200),
    itpm=st.integers(min_value=100_000, max_value=2_000_000),
    otpm=st.integers(min_value=20_000, max_value=400_000),
)


@settings(max_examples=25, deadline=None)
@given(mix=st.lists(shapes, min_size=2, max_size=4), org=orgs, order=st.randoms(use_true_random=False))
@example(  # found in CI with a 10 s warm-up: the start's catch-up ran into the window
    mix=[Shape(10, 16, 1.0, 0.5943562788855101), Shape(10, 317, 0.6, 0.2053198266131293)],
    org=Org(rpm=331, itpm=100_000, otpm=34_816),
    order=random.Random(0),  # keeps the config order: p0 first
)
def test_equal_weights_give_equal_shares_whatever_the_sizes_and_the_order(
    mix: list[Shape], org: Org, order: object
) -> None:
    names = [f"p{i}" for i in range(len(mix))]
    shaped = dict(zip(names, mix, strict=True))
    listed = list(names)
    order.shuffle(listed)  # type: ignore[attr-defined]
    used = vtime.run(_run([(p, 1.0) for p in listed], shaped, org))
    _assert_fair({p: _dominant(used[p], org) for p in names}, {p: _grain(shaped[p], org) for p in names})


@settings(max_examples=20, deadline=None)
@given(
    mix=st.lists(st.tuples(shapes, st.integers(min_value=1, max_value=4)), min_size=2, max_size=4),
    org=orgs,
)
@example(  # each request a fifth of a minute's budget: shares are only as exact as the requests
    mix=[
        (Shape(12_360, 4_056, 1.0, 1.0), 4),
        (Shape(19_684, 133, 1.0, 1.0), 1),
        (Shape(19_799, 17, 1.0, 1.0), 2),
        (Shape(19_799, 16, 1.0, 1.0), 1),
    ],
    org=Org(rpm=60, itpm=100_000, otpm=20_000),
)
@example(  # three dominant resources; the large partner's head waits 14 s for its tokens
    mix=[(Shape(100, 16, 0.72, 0.25), 4), (Shape(538, 25, 0.94, 0.39), 1), (Shape(18, 8_191, 0.83, 0.43), 2)],
    org=Org(rpm=889, itpm=100_000, otpm=34_790),
)
def test_shares_follow_the_weights(mix: list[tuple[Shape, int]], org: Org) -> None:
    names = [f"p{i}" for i in range(len(mix))]
    shaped = {p: shape for p, (shape, _) in zip(names, mix, strict=True)}
    weights = [(p, float(w)) for p, (_, w) in zip(names, mix, strict=True)]
    used = vtime.run(_run(weights, shaped, org))
    _assert_fair(
        {p: _dominant(used[p], org) / w for p, w in weights},
        {p: _grain(shaped[p], org) / w for p, w in weights},
    )


def test_the_issue_10_mix_is_fair_in_either_config_order() -> None:
    """Equal weights, OTPM binding (80k), partner A at max_tokens 8192 and B at 512."""
    org = Org(rpm=10_000, itpm=10_000_000, otpm=80_000)
    shaped = {"a": Shape(100, 8_192, 1.0, 1.0), "b": Shape(100, 512, 1.0, 1.0)}
    shares = []
    for order in (["a", "b"], ["b", "a"]):
        used = vtime.run(_run([(p, 1.0) for p in order], shaped, org))
        total = used["a"][2] + used["b"][2]
        shares.append(used["a"][2] / total)
    assert all(abs(s - 0.5) <= 0.02 for s in shares), shares
    assert abs(shares[0] - shares[1]) <= 0.01, shares


@settings(max_examples=15, deadline=None)
@given(shape=shapes, org=orgs, others=st.integers(min_value=1, max_value=3))
def test_one_busy_partner_alone_uses_the_whole_binding_limit(shape: Shape, org: Org, others: int) -> None:
    names = ["busy", *[f"idle{i}" for i in range(others)]]
    used = vtime.run(_run([(p, 1.0) for p in names], dict.fromkeys(names, shape), org, busy=["busy"]))
    # the limiter reserves estimates: at most the reserved/used ratio is lost to in-flight reservations
    assert _dominant(used["busy"], org) >= 0.97, used


@settings(max_examples=15, deadline=None)
@given(flood=shapes, quiet=shapes, org=orgs, arrival=st.floats(min_value=20, max_value=60))
def test_a_quiet_partner_is_served_as_soon_as_its_request_fits(
    flood: Shape, quiet: Shape, org: Org, arrival: float
) -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        sched = Scheduler(_settings([("flood", 1.0), ("quiet", 1.0)], org), clock=loop.time)
        stop = arrival + 5

        async def flooding() -> None:
            while loop.time() < stop:
                g = await sched.acquire("flood", Cost(flood.est_input, flood.max_tokens))
                await asyncio.sleep(LATENCY_S)
                sched.release(g, Usage(flood.est_input, flood.max_tokens))

        tasks = [asyncio.create_task(flooding()) for _ in range(8)]
        await asyncio.sleep(arrival)
        asked = loop.time()
        g = await sched.acquire("quiet", Cost(quiet.est_input, quiet.max_tokens))
        waited = loop.time() - asked
        sched.release(g, Usage(quiet.est_input, quiet.max_tokens))
        await asyncio.gather(*tasks)
        await sched.aclose()
        return waited

    waited = vtime.run(scenario())
    # time for the org buckets to refill the quiet request's own cost, from empty
    fits = max(60 / org.rpm, quiet.est_input * 60 / org.itpm, quiet.max_tokens * 60 / org.otpm)
    assert waited <= fits + 1e-6, (waited, fits)
