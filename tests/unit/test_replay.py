"""Replay protection in process: windows, redeliveries, bounds, and who it applies to.

The Redis store is tested against a real Redis in tests/integration/test_redis_trust.py.
"""

from __future__ import annotations

import orjson

from service.admission.admit import Admission, Admitted, Record, Rejected
from service.admission.registry import Registry
from service.admission.replay import LocalReplayStore, Origin, ReplayGuard, replay_window_s
from service.admission.signature import SignatureVerifier
from service.config.loader import parse_config
from service.config.settings import PartnerSettings
from service.contracts.reasons import Reason
from service.partner.signing import sign

ENV = {"K": "sk", "S": "secret"}


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _partner(**kw: object) -> PartnerSettings:
    return PartnerSettings.model_validate({"id": "acme", "api_key": {"env": "K"}, **kw})


SIGNED = {"required": True, "keys": {"k1": {"env": "S"}}, "max_skew_s": 60}


def test_window_defaults_and_opt_in() -> None:
    assert replay_window_s(_partner()) is None
    assert replay_window_s(_partner(signing=SIGNED)) == 120
    assert replay_window_s(_partner(dedupe=True)) == 600  # 2 x the default max_skew_s
    assert replay_window_s(_partner(dedupe=True, replay_window_s=5)) == 5
    assert replay_window_s(_partner(signing=SIGNED, replay_window_s=500)) == 500


def test_local_store_new_redelivery_replay_and_expiry() -> None:
    clock = Clock()
    store = LocalReplayStore(clock=clock)
    assert store.check_and_record("acme", "r1", "t/0/5", 10) is None
    assert store.check_and_record("acme", "r1", "t/0/5", 10) is None, "same offset again is a redelivery"
    assert store.check_and_record("acme", "r1", "t/1/9", 10) == "t/0/5"
    assert store.check_and_record("globex", "r1", "u/0/1", 10) is None, "ids are per partner"
    clock.t += 10.001
    assert store.check_and_record("acme", "r1", "t/1/9", 10) is None, "after the window it is new again"
    assert store.check_and_record("acme", "r1", "t/0/5", 10) == "t/1/9"


def test_local_store_is_bounded_and_expires_old_entries() -> None:
    clock = Clock()
    store = LocalReplayStore(max_entries=100, clock=clock)
    for i in range(250):
        store.record("acme", f"r{i}", f"t/0/{i}", 60)
    assert len(store) == 100
    assert store.lookup("acme", "r249") == "t/0/249"
    assert store.lookup("acme", "r0") is None  # evicted, oldest first
    clock.t += 61
    store.record("acme", "new", "t/0/999", 60)
    assert len(store) == 1


async def test_guard_applies_only_to_signed_or_deduped_partners() -> None:
    guard = ReplayGuard(LocalReplayStore(clock=Clock()))
    plain, deduped = _partner(), _partner(dedupe=True)
    o1, o2 = Origin("t", 0, 1), Origin("t", 0, 2)
    assert await guard.first_seen(plain, "r", o1) is None
    assert await guard.first_seen(plain, "r", o2) is None
    assert await guard.first_seen(deduped, "r", o1) is None
    assert await guard.first_seen(deduped, "r", o1) is None
    assert await guard.first_seen(deduped, "r", o2) == "t/0/1"


def _admission(now_s: float) -> Admission:
    settings = parse_config({"partners": [{"id": "acme", "api_key": {"env": "K"}, "signing": SIGNED}]})
    return Admission(
        Registry.build(settings, environ=ENV),
        signatures=SignatureVerifier(clock=lambda: now_s),
        replay=ReplayGuard(LocalReplayStore(clock=lambda: now_s)),
    )


def _record(offset: int, now_ms: int, rid: str = "r-1", partition: int = 0) -> Record:
    value = orjson.dumps(
        {
            "request_id": rid,
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}],
            },
        }
    )
    topic = "claude.requests.acme"
    headers = sign(topic, rid.encode(), value, rid, "k1", "secret", now_ms)
    return Record(topic, partition, offset, now_ms, rid.encode(), value, tuple(headers))


async def test_signed_copy_is_a_replay_but_a_redelivery_is_not() -> None:
    now = 1_764_000_000.0
    adm = _admission(now)
    first = _record(10, int(now * 1000))
    assert isinstance(await adm.admit_and_reserve(first), Admitted)
    assert isinstance(await adm.admit_and_reserve(first), Admitted), "Kafka redelivered the same offset"
    copy = _record(11, int(now * 1000))
    verdict = await adm.admit_and_reserve(copy)
    assert isinstance(verdict, Rejected)
    assert (verdict.reason, verdict.request_id) == (Reason.REPLAY, "r-1")
    assert "claude.requests.acme/0/10" in verdict.detail
    other_partition = await adm.admit_and_reserve(_record(10, int(now * 1000), partition=1))
    assert isinstance(other_partition, Rejected)
    assert other_partition.reason is Reason.REPLAY


async def test_a_rejected_request_does_not_burn_its_id() -> None:
    now = 1_764_000_000.0
    adm = _admission(now)
    bad = _record(1, int(now * 1000))
    bad = Record(bad.topic, 0, 1, bad.timestamp, bad.key, bad.value, bad.headers[:2])  # no signature
    verdict = await adm.admit_and_reserve(bad)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.MISSING_SIGNATURE
    assert isinstance(await adm.admit_and_reserve(_record(2, int(now * 1000))), Admitted)
