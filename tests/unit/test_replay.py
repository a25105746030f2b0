"""Replay protection in process: which clock, redeliveries, forgetting, bounds, who it applies to.

Every time is controlled: a record's append time (LogAppendTime topics) or the wall clock
passed to the guard and the signature verifier. The Redis store is tested against a real
Redis in tests/integration/test_redis_trust.py, a lagging gateway on the real broker in
tests/integration/test_replay_lag.py.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from claude_gateway_client.signing import sign

from service.admission.admit import Admission, Admitted, Record, Rejected
from service.admission.operator_replay import OperatorReplays
from service.admission.registry import Registry
from service.admission.replay import LocalReplayStore, Origin, ReplayGuard, Sighting, replay_window_s
from service.admission.signature import SignatureVerifier
from service.config.loader import parse_config
from service.config.settings import PartnerSettings
from service.contracts import operator_replay
from service.contracts.reasons import Reason
from tests.support.clock import FakeClock

ENV = {"K": "sk", "S": "secret"}
T0 = 1_764_000_000_000
TOPIC = "claude.requests.acme"


def _partner(**kw: object) -> PartnerSettings:
    return PartnerSettings.model_validate({"id": "acme", "api_key": {"env": "K"}, **kw})


SIGNED = {"required": True, "keys": {"k1": {"env": "S"}}, "max_skew_s": 60}


def test_window_defaults_and_opt_in() -> None:
    assert replay_window_s(_partner()) is None
    assert replay_window_s(_partner(signing=SIGNED)) == 120
    assert replay_window_s(_partner(dedupe=True)) == 600  # 2 x the default max_skew_s
    assert replay_window_s(_partner(dedupe=True, replay_window_s=5)) == 5
    assert replay_window_s(_partner(signing=SIGNED, replay_window_s=500)) == 500


def _check(store: LocalReplayStore, pid: str, origin: str, at: int, expires: int | None = None) -> str | None:
    return store.check_and_record(
        pid, "r1", origin, at_ms=at, expires_ms=at + 10_000 if expires is None else expires, keep_ms=10_000
    )


def test_local_store_new_redelivery_replay_and_expiry_in_the_records_clock() -> None:
    store = LocalReplayStore()
    assert _check(store, "acme", "t/0/5", T0) is None
    assert _check(store, "acme", "t/0/5", T0 + 1) is None, "same offset again is a redelivery"
    assert _check(store, "acme", "t/1/9", T0 + 10_000) == "t/0/5", "at the expiry it still holds"
    assert _check(store, "globex", "u/0/1", T0) is None, "ids are per partner"
    assert _check(store, "acme", "t/1/9", T0 + 10_001) is None, "after the expiry it is new again"
    assert _check(store, "acme", "t/0/5", T0 + 10_002) == "t/1/9"


def test_a_late_read_of_an_early_copy_is_a_replay_whatever_the_wall_clock() -> None:
    """Nothing here reads a clock: the store's only time is the records' `at`."""
    store = LocalReplayStore()
    assert _check(store, "acme", "t/0/5", T0) is None
    for i in range(1_000):  # the partner's backlog, read one by one, all appended at once
        store.check_and_record(
            "acme", f"other-{i}", f"t/0/{6 + i}", at_ms=T0 + 50, expires_ms=T0 + 10_050, keep_ms=10_000
        )
    assert _check(store, "acme", "t/0/2000", T0 + 100) == "t/0/5"


def test_sightings_are_forgotten_by_the_partners_reading_clock() -> None:
    store = LocalReplayStore()
    store.record("acme", "r1", Sighting("t/0/1", T0 + 10_000), at_ms=T0, keep_ms=5_000)
    store.record("globex", "r1", Sighting("u/0/1", T0 + 10_000), at_ms=T0, keep_ms=5_000)
    store.observe("acme", T0 + 14_999)
    assert store.lookup("acme", "r1") == Sighting("t/0/1", T0 + 10_000), "kept: the margin is not over"
    store.observe("globex", T0 + 60_000)  # another partner's clock does not move acme's
    assert store.lookup("acme", "r1") is not None
    assert store.lookup("globex", "r1") is None
    store.observe("acme", T0 + 1_000)  # the clock never goes back
    assert store.clock_ms("acme") == T0 + 14_999
    store.observe("acme", T0 + 15_000)
    assert store.lookup("acme", "r1") is None
    assert len(store) == 0


def test_a_rerecorded_id_is_kept_until_its_new_drop_time() -> None:
    store = LocalReplayStore()
    store.record("acme", "r1", Sighting("t/0/1", T0 + 1_000), at_ms=T0, keep_ms=1_000)
    store.record("acme", "r1", Sighting("t/0/9", T0 + 9_000), at_ms=T0 + 5_000, keep_ms=1_000)
    store.observe("acme", T0 + 2_000)  # the first drop time is stale: the id stays
    assert store.lookup("acme", "r1") == Sighting("t/0/9", T0 + 9_000)
    assert len(store) == 1
    store.observe("acme", T0 + 10_000)
    assert store.lookup("acme", "r1") is None
    assert len(store) == 0


def test_local_store_is_bounded_and_evicts_the_largest_partners_next_due() -> None:
    store = LocalReplayStore(max_entries=100)
    store.record("quiet", "q", Sighting("q/0/0", T0 + 1), at_ms=T0, keep_ms=1)
    for i in range(250):
        store.record("acme", f"r{i}", Sighting(f"t/0/{i}", T0 + 60_000 + i), at_ms=T0, keep_ms=60_000)
    assert len(store) == 100
    assert store.lookup("acme", "r249") is not None
    assert store.lookup("acme", "r0") is None  # evicted, next due first
    assert store.lookup("quiet", "q") is not None, "a quiet partner keeps its ids"


async def test_guard_applies_only_to_signed_or_deduped_partners() -> None:
    guard = ReplayGuard(LocalReplayStore(), clock=FakeClock(T0 / 1000))
    plain, deduped = _partner(), _partner(dedupe=True)
    o1, o2 = Origin("t", 0, 1), Origin("t", 0, 2)
    assert await guard.first_seen(plain, "r", o1) is None
    assert await guard.first_seen(plain, "r", o2) is None
    assert await guard.first_seen(deduped, "r", o1) is None
    assert await guard.first_seen(deduped, "r", o1) is None
    assert await guard.first_seen(deduped, "r", o2) == "t/0/1"


async def test_guard_without_append_time_counts_on_the_wall_clock_at_reading() -> None:
    clock = FakeClock(T0 / 1000)
    guard = ReplayGuard(LocalReplayStore(), clock=clock)
    ps = _partner(dedupe=True, replay_window_s=30)
    assert await guard.first_seen(ps, "r", Origin("t", 0, 1)) is None
    clock.advance(30)
    assert await guard.first_seen(ps, "r", Origin("t", 0, 2)) == "t/0/1"
    clock.advance(0.001)
    assert await guard.first_seen(ps, "r", Origin("t", 0, 3)) is None


async def test_guard_holds_a_sighting_while_its_signature_is_valid_even_past_the_window() -> None:
    guard = ReplayGuard(LocalReplayStore(), clock=FakeClock(T0 / 1000))
    ps = _partner(dedupe=True, replay_window_s=5)
    valid_until = T0 + 60_000  # signed at T0, max_skew_s 60
    first = await guard.first_seen(ps, "r", Origin("t", 0, 1), appended_ms=T0, valid_until_ms=valid_until)
    assert first is None
    late = await guard.first_seen(ps, "r", Origin("t", 0, 2), appended_ms=T0 + 59_000)
    assert late == "t/0/1"


# -- admission: the signature and the replay check on one clock ---------------------------------


def _admission(
    clock: FakeClock, *, window_s: float | None = None, operator_key: Path | None = None
) -> Admission:
    acme: dict[str, object] = {"id": "acme", "api_key": {"env": "K"}, "signing": SIGNED}
    if window_s is not None:
        acme["replay_window_s"] = window_s
    cfg: dict[str, object] = {"partners": [acme]}
    if operator_key is not None:
        cfg["operator_replay"] = {"keys": {"ops1": {"file": str(operator_key)}}, "max_age_s": 300}
    settings = parse_config(cfg)
    replays = OperatorReplays(clock=clock)
    replays.configure(settings)
    return Admission(
        Registry.build(settings, environ=ENV),
        signatures=SignatureVerifier(clock=clock),
        replay=ReplayGuard(LocalReplayStore(), clock=clock),
        operator_replays=replays,
    )


def _value(rid: str) -> bytes:
    params = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    return orjson.dumps({"request_id": rid, "params": params})


def _record(
    offset: int,
    signed_ms: int,
    rid: str = "r-1",
    partition: int = 0,
    appended_ms: int | None = None,
    extra: tuple[tuple[str, bytes], ...] = (),
) -> Record:
    """A signed record; `appended_ms`: its LogAppendTime (None: a CreateTime topic)."""
    value = _value(rid)
    headers = (*sign(TOPIC, rid.encode(), value, rid, "k1", "secret", signed_ms), *extra)
    if appended_ms is None:
        return Record(TOPIC, partition, offset, signed_ms, rid.encode(), value, headers)
    return Record(TOPIC, partition, offset, appended_ms, rid.encode(), value, headers, timestamp_type=1)


async def test_signed_copy_is_a_replay_but_a_redelivery_is_not() -> None:
    adm = _admission(FakeClock(T0 / 1000))
    first = _record(10, T0)
    assert isinstance(await adm.admit_and_reserve(first), Admitted)
    assert isinstance(await adm.admit_and_reserve(first), Admitted), "Kafka redelivered the same offset"
    verdict = await adm.admit_and_reserve(_record(11, T0))
    assert isinstance(verdict, Rejected)
    assert (verdict.reason, verdict.request_id) == (Reason.REPLAY, "r-1")
    assert "claude.requests.acme/0/10" in verdict.detail
    other_partition = await adm.admit_and_reserve(_record(10, T0, partition=1))
    assert isinstance(other_partition, Rejected)
    assert other_partition.reason is Reason.REPLAY


async def test_a_copy_appended_in_time_but_read_after_the_window_is_a_replay() -> None:
    """The lagging consumer: the original and a copy are appended within `max_skew_s` of the
    signature; the gateway reads the original long after, and the copy later still (the
    partner was paused, deferred by its budget, or the consumer lagged) than the window."""
    clock = FakeClock(T0 / 1000)
    adm = _admission(clock)  # max_skew_s 60, window 120 s
    clock.now = (T0 + 500_000) / 1000  # read 500 s after it was appended: LogAppendTime keeps it fresh
    assert isinstance(await adm.admit_and_reserve(_record(1, T0, appended_ms=T0 + 20)), Admitted)
    clock.advance(3_600)  # an hour later, the copy from the backlog
    copy = _record(2, T0, appended_ms=T0 + 40_000)
    verdict = await adm.admit_and_reserve(copy)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.REPLAY
    assert "claude.requests.acme/0/1" in verdict.detail


async def test_a_copy_appended_after_the_signature_expired_is_stale_and_a_fresh_one_is_remembered() -> None:
    clock = FakeClock(T0 / 1000)
    adm = _admission(clock, window_s=120)
    clock.now = (T0 + 900_000) / 1000
    assert isinstance(await adm.admit_and_reserve(_record(1, T0, appended_ms=T0)), Admitted)
    stale = await adm.admit_and_reserve(_record(2, T0, appended_ms=T0 + 60_001))
    assert isinstance(stale, Rejected)
    assert stale.reason is Reason.STALE_TIMESTAMP
    resigned = await adm.admit_and_reserve(_record(3, T0 + 100_000, appended_ms=T0 + 100_000))
    assert isinstance(resigned, Rejected), "signed again within the window: still a replay"
    assert resigned.reason is Reason.REPLAY
    later = await adm.admit_and_reserve(_record(4, T0 + 120_001, appended_ms=T0 + 120_001))
    assert isinstance(later, Admitted), "signed again after the window: a new request"


async def test_on_a_create_time_topic_the_reading_time_is_the_clock() -> None:
    clock = FakeClock(T0 / 1000)
    adm = _admission(clock)
    assert isinstance(await adm.admit_and_reserve(_record(1, T0)), Admitted)
    clock.advance(59)
    copy = await adm.admit_and_reserve(_record(2, T0))
    assert isinstance(copy, Rejected)
    assert copy.reason is Reason.REPLAY
    clock.advance(2)  # 61 s after signing, read by the gateway's clock: stale before any replay check
    stale = await adm.admit_and_reserve(_record(3, T0))
    assert isinstance(stale, Rejected)
    assert stale.reason is Reason.STALE_TIMESTAMP


async def test_an_operator_replay_read_late_is_accepted_once_and_its_copy_refused(tmp_path: Path) -> None:
    (tmp_path / "ops1").write_text("operator-secret")
    clock = FakeClock(T0 / 1000)
    adm = _admission(clock, operator_key=tmp_path / "ops1")
    assert isinstance(await adm.admit_and_reserve(_record(1, T0, appended_ms=T0)), Admitted)
    marked_at = T0 + 7_200_000  # two hours later an operator replays the dead letter
    mark = operator_replay.sign("operator-secret", "ops1", TOPIC, "r-1", "dlq/0/3", _value("r-1"), marked_at)
    header = ((operator_replay.HEADER, mark.encode()),)
    clock.now = (marked_at + 200_000) / 1000  # read 200 s after the mark (max_age_s 300)
    replayed = _record(5, T0, appended_ms=marked_at + 1_000, extra=header)
    assert isinstance(await adm.admit_and_reserve(replayed), Admitted)
    clock.now = (marked_at + 290_000) / 1000
    copy = await adm.admit_and_reserve(_record(6, T0, appended_ms=marked_at + 2_000, extra=header))
    assert isinstance(copy, Rejected)
    assert copy.reason is Reason.REPLAY
    assert f"{TOPIC}/0/5" in copy.detail


async def test_a_rejected_request_does_not_burn_its_id() -> None:
    adm = _admission(FakeClock(T0 / 1000))
    bad = _record(1, T0)
    bad = Record(bad.topic, 0, 1, bad.timestamp, bad.key, bad.value, bad.headers[:2])  # no signature
    verdict = await adm.admit_and_reserve(bad)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.MISSING_SIGNATURE
    assert isinstance(await adm.admit_and_reserve(_record(2, T0)), Admitted)


def test_the_sightings_held_can_be_listed_while_new_partners_are_checked() -> None:
    """The write-back into an emptied Redis awaits between partners while checks go on: a new
    partner's first sighting must not break the listing ('dictionary changed size')."""
    store = LocalReplayStore()
    store.record("acme", "r1", Sighting("t/0/1", 2_000), at_ms=1_000, keep_ms=1_000)
    store.record("globex", "g1", Sighting("t/1/1", 2_000), at_ms=1_000, keep_ms=1_000)
    listed = []
    for pid, _clock, rows in store.held():
        listed.append((pid, [rid for rid, _, _ in rows]))
        store.record("initech", "i1", Sighting("t/2/1", 2_000), at_ms=1_000, keep_ms=1_000)
    assert listed == [("acme", ["r1"]), ("globex", ["g1"])]
