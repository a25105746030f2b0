"""Token buckets and the local limiter, on a fake clock (ANTHROPIC.md: limits are
per-minute token buckets refilling continuously; OTPM is reserved as max_tokens and
corrected from real output; a 429's retry-after pauses the bucket)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.config.settings import LimitSettings
from service.scheduling.buckets import TokenBucket
from service.scheduling.limiter import NOT_CALLED, Cost, LocalLimiter, Usage, parse_ratelimit_headers
from service.scheduling.pools import DEFAULT_CLASS, LimitConfig, PauseScope
from tests.support.clock import FakeClock


def test_bucket_refills_continuously_to_capacity() -> None:
    b = TokenBucket.per_minute(60, now=0.0)
    b.take(60)
    assert b.wait_s(1, now=0.0) == 1.0  # 60/min = one a second
    assert b.wait_s(1, now=1.0) == 0.0
    b.refill(now=1000.0)
    assert b.level == 60


def test_a_cost_above_capacity_waits_for_a_full_bucket_then_goes_negative() -> None:
    b = TokenBucket.per_minute(100, now=0.0)
    assert b.wait_s(500, now=0.0) == 0.0
    b.take(500)
    assert b.level == -400
    assert b.wait_s(1, now=0.0) > 240


@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=5), st.integers(min_value=1, max_value=50)), max_size=200
    )
)
def test_limiter_never_grants_more_than_capacity_plus_refill(steps: list[tuple[float, int]]) -> None:
    clock = FakeClock()
    start = clock.now
    limiter = LocalLimiter(LimitSettings(rpm=120, itpm=5_000), {}, clock=clock)
    granted_requests = 0
    granted_input = 0
    for advance, tokens in steps:
        clock.advance(advance)
        if limiter.try_acquire("p", Cost(tokens, 0)).ok:
            granted_requests += 1
            granted_input += tokens
    elapsed = clock.now - start
    assert granted_requests <= 120 + elapsed * 2 + 1e-9
    assert granted_input <= 5_000 + elapsed * 5_000 / 60 + 1e-6


def test_partner_limit_binds_before_the_org_and_says_so() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(LimitSettings(rpm=600), {"a": LimitSettings(rpm=2)}, clock=clock)
    assert limiter.try_acquire("a", Cost(1, 1)).ok
    assert limiter.try_acquire("a", Cost(1, 1)).ok
    d = limiter.try_acquire("a", Cost(1, 1))
    assert (d.ok, d.scope) == (False, "partner")
    assert d.wait_s == 30.0
    assert limiter.try_acquire("b", Cost(1, 1)).ok  # another partner is unaffected


def test_settlement_refunds_unused_reservation() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(LimitSettings(itpm=1000, otpm=1000), {}, clock=clock)
    assert limiter.try_acquire("p", Cost(400, 800)).ok
    assert not limiter.try_acquire("p", Cost(400, 800)).ok
    limiter.settle("p", Cost(400, 800), Usage(100, 50))
    levels = limiter.levels()
    assert levels[("org", "itpm")] == 900  # 1000 - 400 reserved + 300 unused
    assert levels[("org", "otpm")] == 950
    assert limiter.try_acquire("p", Cost(400, 800)).ok


def test_unknown_outcome_keeps_the_reservation() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(LimitSettings(otpm=1000), {}, clock=clock)
    limiter.try_acquire("p", Cost(1, 600))
    limiter.settle("p", Cost(1, 600), None)
    assert limiter.levels()[("org", "otpm")] == 400


ANY = Cost(1, 1)


def test_headers_clamp_the_org_bucket_but_never_raise_it() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(LimitSettings(rpm=100, itpm=100_000), {}, clock=clock)
    limiter.observe_headers(
        "p",
        ANY,
        {
            "anthropic-ratelimit-requests-limit": "100",
            "anthropic-ratelimit-requests-remaining": "10",
            "anthropic-ratelimit-input-tokens-limit": "100000",
            "anthropic-ratelimit-input-tokens-remaining": "20000",
        },
    )
    levels = limiter.levels()
    assert levels[("org", "rpm")] == 10
    assert levels[("org", "itpm")] == 20_500  # rounded to the nearest thousand upstream
    limiter.observe_headers("p", ANY, {"anthropic-ratelimit-requests-remaining": "90"})
    assert limiter.levels()[("org", "rpm")] == 10


def test_a_lower_reported_limit_is_the_keys_workspace_not_the_org() -> None:
    """ANTHROPIC.md: the headers report the most restrictive limit in effect, so a key in a
    smaller workspace reports its workspace's figures: they must not shrink the org pool."""
    clock = FakeClock()
    limiter = LocalLimiter(LimitSettings(rpm=1000), {}, clock=clock)
    limiter.observe_headers(
        "p",
        ANY,
        {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0"},
    )
    assert limiter.levels()[("org", "rpm")] == 1000


def test_a_larger_reported_limit_is_logged_and_kept_out_unless_allowed(caplog: object) -> None:
    clock = FakeClock()
    headers = {"anthropic-ratelimit-requests-limit": "5000", "anthropic-ratelimit-requests-remaining": "4990"}
    limiter = LocalLimiter(LimitSettings(rpm=1000), {}, clock=clock)
    limiter.observe_headers("p", ANY, headers)
    assert limiter.levels()[("org", "rpm")] == 1000
    assert "larger limit than configured" in caplog.text  # type: ignore[attr-defined]
    follow = LocalLimiter(
        LimitConfig(pools={DEFAULT_CLASS: LimitSettings(rpm=1000)}, follow_header_limits=True), clock=clock
    )
    follow.observe_headers("p", ANY, headers)
    clock.advance(60)
    assert follow.levels()[("org", "rpm")] == 5000


def test_a_429_pause_holds_only_its_scope() -> None:
    clock = FakeClock()
    config = LimitConfig(
        pools={DEFAULT_CLASS: LimitSettings(rpm=1000), "opus": LimitSettings(rpm=100)},
        partners={"a": LimitSettings(), "b": LimitSettings(), "c": LimitSettings()},
        scopes={"a": "workspace:w1", "b": "workspace:w1", "c": "key:c"},
    )
    limiter = LocalLimiter(config, clock=clock)
    limiter.pause(PauseScope("key", "workspace:w1"), 3)
    for pid in ("a", "b"):
        d = limiter.try_acquire(pid, ANY)
        assert (d.ok, d.scope, d.wait_s) == (False, "key", 3)
    assert limiter.try_acquire("c", ANY).ok
    limiter.pause(PauseScope("org", "opus"), 5)
    d = limiter.try_acquire("c", Cost(1, 1, "opus"))
    assert (d.ok, d.scope, d.wait_s) == (False, "org", 5)
    assert limiter.try_acquire("c", ANY).ok  # the default pool is not paused
    clock.advance(3)
    assert limiter.try_acquire("a", ANY).ok


def test_model_classes_draw_on_their_own_pool() -> None:
    clock = FakeClock()
    config = LimitConfig(pools={DEFAULT_CLASS: LimitSettings(rpm=10), "haiku": LimitSettings(rpm=2)})
    limiter = LocalLimiter(config, clock=clock)
    haiku = Cost(1, 1, config.model_class("claude-haiku-4-5"))
    assert haiku.model_class == "haiku"
    assert limiter.try_acquire("p", haiku).ok
    assert limiter.try_acquire("p", haiku).ok
    assert not limiter.try_acquire("p", haiku).ok
    assert limiter.try_acquire("p", Cost(1, 1, config.model_class("claude-opus-4-1"))).ok
    levels = limiter.levels()
    assert levels[("org:haiku", "rpm")] == 0
    assert levels[("org", "rpm")] == 9


def test_a_call_never_made_refunds_the_request_too() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(LimitSettings(rpm=10, otpm=1000), {}, clock=clock)
    assert limiter.try_acquire("p", Cost(1, 600)).ok
    limiter.settle("p", Cost(1, 600), NOT_CALLED)
    assert limiter.levels()[("org", "rpm")] == 10
    assert limiter.levels()[("org", "otpm")] == 1000


def test_parse_headers_ignores_garbage() -> None:
    assert parse_ratelimit_headers({"anthropic-ratelimit-requests-remaining": "n/a"}) == {}
    assert parse_ratelimit_headers({"anthropic-ratelimit-output-tokens-limit": "8000"}) == {
        "otpm": (8000, None)
    }


def test_headers_update_the_pool_the_call_drew_on() -> None:
    clock = FakeClock()
    config = LimitConfig(pools={DEFAULT_CLASS: LimitSettings(rpm=1000), "haiku": LimitSettings(rpm=500)})
    limiter = LocalLimiter(config, clock=clock)
    headers = {"anthropic-ratelimit-requests-limit": "500", "anthropic-ratelimit-requests-remaining": "120"}
    limiter.observe_headers("p", Cost(1, 1, "haiku"), headers)
    levels = limiter.levels()
    assert levels[("org:haiku", "rpm")] == 120
    assert levels[("org", "rpm")] == 1000
