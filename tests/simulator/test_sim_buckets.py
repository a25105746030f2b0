"""Token buckets with a fake clock: refill, admission, retry-after, OTPM settlement."""

from __future__ import annotations

import math

import pytest

from service.simulator.buckets import BucketSet, RateLimiter, Refusal, TokenBucket
from service.simulator.config import LimitSettings
from tests.simulator.simkit import FakeClock


def test_bucket_starts_full_and_refills_continuously() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, clock)  # 1 per second
    assert bucket.level() == 60
    bucket.take(60)
    assert bucket.level() == 0
    clock.advance(0.5)
    assert bucket.level() == pytest.approx(0.5)
    clock.advance(10)
    assert bucket.level() == pytest.approx(10.5)
    clock.advance(1_000)
    assert bucket.level() == 60  # never above capacity


def test_wait_is_time_until_enough_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(600, clock)  # 10 per second
    bucket.take(600)
    assert bucket.wait_s(50) == pytest.approx(5.0)
    assert bucket.wait_s(0) == 0
    assert math.isinf(bucket.wait_s(601))  # more than the whole capacity


@pytest.mark.parametrize("limit", [None, 0])
def test_unlimited_bucket_never_refuses(limit: int | None) -> None:
    bucket = TokenBucket(limit, FakeClock())
    assert bucket.unlimited
    bucket.take(10**12)
    assert bucket.wait_s(10**12) == 0
    assert bucket.full_in_s() == 0


def test_admission_takes_from_all_buckets_or_none() -> None:
    clock = FakeClock()
    buckets = BucketSet("default", LimitSettings(rpm=10, itpm=1_000, otpm=500), clock)
    assert buckets.try_admit(input_tokens=400, output_estimate=200) is None
    assert buckets.requests.level() == 9
    assert buckets.input_tokens.level() == 600
    assert buckets.output_tokens.level() == 300

    refusal = buckets.try_admit(input_tokens=100, output_estimate=400)  # OTPM short by 100
    assert refusal is not None
    assert refusal.buckets == ("output_tokens",)
    # Nothing was taken from the other buckets.
    assert buckets.requests.level() == 9
    assert buckets.input_tokens.level() == 600


def test_retry_after_is_enough_and_not_more_than_a_second_too_long() -> None:
    clock = FakeClock()
    buckets = BucketSet("default", LimitSettings(rpm=None, itpm=6_000, otpm=None), clock)  # 100/s
    assert buckets.try_admit(6_000, 1) is None
    refusal = buckets.try_admit(250, 1)
    assert refusal is not None
    assert refusal.wait_s == pytest.approx(2.5)
    assert refusal.retry_after_s == 3  # ceil
    clock.advance(refusal.retry_after_s - 1)
    assert buckets.try_admit(250, 1) is not None  # one second earlier is not enough
    clock.advance(1)
    assert buckets.try_admit(250, 1) is None  # exactly retry-after later it is


def test_retry_after_is_at_least_one_second() -> None:
    assert Refusal(("requests",), 0.001).retry_after_s == 1
    assert Refusal(("requests",), 1.0).retry_after_s == 1
    assert Refusal(("requests",), 1.01).retry_after_s == 2


def test_request_larger_than_capacity_is_refused_for_good() -> None:
    buckets = BucketSet("default", LimitSettings(rpm=None, itpm=None, otpm=1_000), FakeClock())
    refusal = buckets.try_admit(10, 4_096)
    assert refusal is not None
    assert refusal.never
    assert refusal.retry_after_s == 60


def test_rpm_bucket_refills_one_request_per_interval() -> None:
    clock = FakeClock()
    buckets = BucketSet("default", LimitSettings(rpm=60, itpm=None, otpm=None), clock)
    for _ in range(60):
        assert buckets.try_admit(1, 1) is None
    refusal = buckets.try_admit(1, 1)
    assert refusal is not None
    assert refusal.retry_after_s == 1
    clock.advance(1)
    assert buckets.try_admit(1, 1) is None


def test_otpm_estimate_is_corrected_to_real_output() -> None:
    clock = FakeClock()
    buckets = BucketSet("default", LimitSettings(rpm=None, itpm=None, otpm=1_000), clock)
    assert buckets.try_admit(10, 800) is None
    assert buckets.output_tokens.level() == 200
    # While the call runs, the reservation blocks a second large call...
    assert buckets.try_admit(10, 800) is not None
    buckets.settle_output(estimate=800, actual=50)
    # ...and once settled only the real output stays taken.
    assert buckets.output_tokens.level() == 950
    assert buckets.try_admit(10, 800) is None


def test_settlement_never_overfills() -> None:
    clock = FakeClock()
    buckets = BucketSet("default", LimitSettings(rpm=None, itpm=None, otpm=1_000), clock)
    assert buckets.try_admit(10, 100) is None
    clock.advance(60)
    buckets.settle_output(estimate=100, actual=0)
    assert buckets.output_tokens.level() == 1_000


def test_full_in_s() -> None:
    clock = FakeClock()
    bucket = TokenBucket(120, clock)  # 2 per second
    bucket.take(30)
    assert bucket.full_in_s() == pytest.approx(15.0)


def test_limiter_picks_model_class_buckets() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        LimitSettings(rpm=100),
        {"opus": LimitSettings(rpm=5)},
        count_tokens_rpm=10,
        clock=clock,
    )
    assert limiter.for_model("claude-opus-4-7") is limiter.for_model("claude-opus-4-1")
    assert limiter.for_model("claude-opus-4-7").name == "opus"
    assert limiter.for_model("claude-haiku-4-5") is limiter.default
    assert limiter.for_model(None) is limiter.default
    snapshot = limiter.snapshot()
    assert set(snapshot) == {"default", "opus", "count_tokens"}
    assert snapshot["opus"]["requests"]["limit"] == 5


def test_limiter_count_tokens_rpm_and_reset() -> None:
    clock = FakeClock()
    limiter = RateLimiter(LimitSettings(), count_tokens_rpm=2, clock=clock)
    assert limiter.try_count_tokens() is None
    assert limiter.try_count_tokens() is None
    refusal = limiter.try_count_tokens()
    assert refusal is not None
    assert refusal.retry_after_s == 30
    limiter.reset()
    assert limiter.try_count_tokens() is None
