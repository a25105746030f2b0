"""The expected batch turnaround `auto` routing uses (service/batches/routing.py)."""

from __future__ import annotations

from service.batches.routing import Router, Turnaround, Urgency
from service.config.batching import BatchSettings
from service.config.loader import parse_config

NOW = 1_796_083_200.0


def _batches(**kw: object) -> BatchSettings:
    batches = {"enabled": True, "expected_turnaround_s": 3600, **kw}
    return parse_config({"batches": batches, "partners": []}).batches


def test_one_slow_batch_among_few_does_not_send_every_auto_request_to_real_time() -> None:
    """Nearest-rank p95 of 5 to 19 values is their maximum: a single batch that took 24 h
    (an expired one) made the expected turnaround 24 h, every `auto` request went real time,
    and with no `auto` batch formed any more nothing could bring the estimate down."""
    s = _batches()
    router = Router(Turnaround(s))
    router.turnaround.observe(86_400.0)
    for _ in range(10):
        router.turnaround.observe(300.0)
    assert router.route(s, Urgency("auto", NOW + 7200), NOW) == "batch"


def test_a_reloaded_prior_is_used() -> None:
    """`batches.expected_turnaround_s` changed by a reload applies to the next request."""
    router = Router(Turnaround(_batches()))
    slower = _batches(expected_turnaround_s=10 * 3600)
    assert router.route(slower, Urgency("auto", NOW + 7200), NOW) == "realtime"
