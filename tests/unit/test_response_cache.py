"""The response cache without Kafka or Redis: the key, entries, the in-process LRU, the front's
decisions (opt-in, what is stored, whose entries are read, Redis failures as misses) and the
config. The Redis store is tested on a real Redis in tests/integration/test_response_cache_store.py,
the whole path on a real broker in tests/integration/test_response_cache.py.
"""

from __future__ import annotations

import base64
import copy
import random
import zlib
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError

from service.admission.admit import Admitted
from service.admission.pricing import unbilled
from service.admission.registry import Registry
from service.config.advice import warnings
from service.config.loader import ConfigError, parse_config
from service.config.redis_health import RedisHealth
from service.config.settings import GatewaySettings
from service.contracts.outcomes import Timings
from service.contracts.schemas import validate
from service.response_cache import key as key_module
from service.response_cache.cache import Lookup, ResponseCache, cached_response
from service.response_cache.entry import CorruptEntry, Entry, decode, encode
from service.response_cache.key import cache_key, canonical, scope_of
from service.response_cache.store import ENTRY_OVERHEAD_BYTES, NO_ROOM, STORED, LocalStore, Put, RedisStore
from service.telemetry.metrics import Metrics
from tests.support.clock import FakeClock

PARAMS: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 256,
    "system": "Be brief.",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
    "stop_sequences": ["\n\nHuman:"],
    "metadata": {"user_id": "u-1"},
}


# -- the key -----------------------------------------------------------------------------


def test_key_order_and_whitespace_do_not_matter() -> None:
    a = b'{"model":"claude-haiku-4-5","max_tokens":256,"messages":[{"role":"user","content":"Hi"}]}'
    b = b"""{ "messages" : [ { "content" : "Hi",  "role" : "user" } ],
               "max_tokens": 256,   "model": "claude-haiku-4-5" }"""
    assert cache_key("partner:acme", orjson.loads(a)) == cache_key("partner:acme", orjson.loads(b))
    assert canonical("partner:acme", orjson.loads(a)) == canonical("partner:acme", orjson.loads(b))
    assert b" " not in canonical("partner:acme", orjson.loads(a)).replace(b'"user"', b"")


def _changed(path: str, value: Any) -> dict[str, Any]:
    params = copy.deepcopy(PARAMS)
    node: Any = params
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return params


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model", "claude-sonnet-4-5"),
        ("max_tokens", 257),
        ("max_tokens", 256.0),  # another JSON number: when unsure, include
        ("system", "Be brief!"),
        ("messages.0.content.0.text", "Hello."),
        ("messages.0.role", "assistant"),
        ("messages.0.content.0.cache_control", {"type": "ephemeral"}),
        ("stop_sequences", []),
        ("tools", [{"name": "get_weather", "input_schema": {"type": "object"}}]),
        ("tool_choice", {"type": "any"}),
        ("thinking", {"type": "enabled", "budget_tokens": 1024}),
        ("service_tier", "standard_only"),
        ("speed", "fast"),
        ("inference_geo", "us"),
        ("cache_control", {"type": "ephemeral"}),
        ("container", "container_1"),
    ],
)
def test_any_semantic_param_change_changes_the_key(path: str, value: Any) -> None:
    assert cache_key("partner:acme", _changed(path, value)) != cache_key("partner:acme", PARAMS)


def test_excluded_params_do_not_change_the_key() -> None:
    base = cache_key("partner:acme", PARAMS)
    assert cache_key("partner:acme", _changed("metadata", {"user_id": "someone-else"})) == base
    without = {k: v for k, v in PARAMS.items() if k != "metadata"}
    assert cache_key("partner:acme", without) == base
    assert cache_key("partner:acme", {**PARAMS, "stream": False}) == base


def test_the_key_is_scoped_to_the_partner_unless_shared() -> None:
    share = [["globex", "acme"], ["initech", "hooli"]]
    assert scope_of("acme", []) == "partner:acme"
    assert scope_of("acme", share) == scope_of("globex", share) == "shared:acme,globex"
    assert scope_of("initech", share) == "shared:hooli,initech"
    assert scope_of("umbrella", share) == "partner:umbrella"
    keys = {p: cache_key(scope_of(p, share), PARAMS) for p in ("acme", "globex", "initech", "umbrella")}
    assert keys["acme"] == keys["globex"]
    assert len({keys["acme"], keys["initech"], keys["umbrella"]}) == 3
    assert cache_key("partner:acme", PARAMS) != cache_key("partner:globex", PARAMS)
    # a partner whose id looks like a group's scope cannot reach the group's entries
    assert cache_key(scope_of("acme,globex", []), PARAMS) != keys["acme"]


def test_the_format_version_is_in_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache_key("partner:acme", PARAMS)
    monkeypatch.setattr(key_module, "CACHE_FORMAT", key_module.CACHE_FORMAT + 1)
    assert cache_key("partner:acme", PARAMS) != before
    assert b'"format":2' in canonical("partner:acme", PARAMS)


# -- entries -----------------------------------------------------------------------------


def _message(text: str = "Hi there", stop: str | None = "end_turn") -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 34},
    }


def test_entries_round_trip_and_compress_only_when_it_pays() -> None:
    small = Entry(_message(), "req_1", 1000.0, 1060.0)
    assert decode(encode(small, 1024)) == small
    assert encode(small, 1024)[0] == 0, "below compress_min_bytes: raw"
    big = Entry(_message("the same words again " * 500), None, 1000.5, 4600.25)
    blob = encode(big, 1024)
    assert blob[0] == 1
    assert len(blob) < len(orjson.dumps(big.message)) / 5
    assert decode(blob) == big
    noise = Entry(_message(base64.b64encode(random.Random(1).randbytes(3000)).decode()), None, 1, 2)
    assert decode(encode(noise, 0)) == noise
    for bad in (
        b"",
        b"\x01" + bytes(16) + b"not zlib",
        b"\x07" + bytes(16) + b"{}",
        b"\x00" + bytes(16) + b"[]",
    ):
        with pytest.raises(CorruptEntry):
            decode(bad)


def test_entry_freshness_is_bounded_by_expiry_and_the_readers_ttl() -> None:
    e = Entry(_message(), None, 1000.0, 1100.0)
    assert e.fresh(1050.0, 100)
    assert not e.fresh(1100.0, 1000), "expired"
    assert not e.fresh(1050.0, 30), "older than this reader's ttl"


# -- the in-process LRU ------------------------------------------------------------------


async def test_local_lru_is_bounded_by_bytes_and_evicts_the_least_recently_used() -> None:
    clock = FakeClock(1000.0)
    store = LocalStore(clock)
    cap = 3 * (100 + ENTRY_OVERHEAD_BYTES)
    for k in "abc":
        assert (await store.put(k, bytes(100), 1000, 2000, cap)).result == STORED
    assert store.held_bytes == cap
    assert await store.get("a") is not None  # a is now the most recently used
    put = await store.put("d", bytes(100), 1000, 2000, cap)
    assert put == Put(STORED, cap, 1)
    assert await store.get("b") is None, "b was the least recently used"
    assert {k for k in "acd" if await store.get(k) is not None} == set("acd")
    put = await store.put("e", bytes(250), 1000, 2000, cap)  # needs two entries' room
    assert put.evicted == 2
    assert store.held_bytes <= cap
    assert len(store) == 2
    assert (await store.put("huge", bytes(cap), 1000, 2000, cap)).result == NO_ROOM
    assert store.held_bytes <= cap
    assert len(store) == 2, "an entry no eviction can make room for evicts nothing"


async def test_local_lru_expires_entries_and_replaces_a_key() -> None:
    clock = FakeClock(1000.0)
    store = LocalStore(clock)
    await store.put("a", b"old", 1000, 1010, 10_000)
    await store.put("a", b"new!", 1000, 1010, 10_000)
    assert await store.get("a") == b"new!"
    assert store.held_bytes == 4 + ENTRY_OVERHEAD_BYTES
    clock.now = 1010.0
    assert await store.get("a") is None
    assert store.held_bytes == 0


# -- the front -----------------------------------------------------------------------------


def _settings(**extra: Any) -> GatewaySettings:
    partners = [
        {"id": "acme", "api_key": {"env": "K"}, "cache": {"enabled": True}},
        {"id": "globex", "api_key": {"env": "K"}, "cache": {"enabled": True, "ttl_s": 60}},
        {"id": "initech", "api_key": {"env": "K"}, "cache": {"enabled": True}},
        {"id": "umbrella", "api_key": {"env": "K"}},
    ]
    return parse_config({"partners": partners, **extra})


def _admitted(
    settings: GatewaySettings, pid: str, params: dict[str, Any] | None = None, rid: str = "r1"
) -> Admitted:
    registry = Registry.build(settings, environ={"K": "sk"})
    return Admitted(registry.by_id[pid], rid, copy.deepcopy(params or PARAMS), {"trace": rid}, 10)


def _cache(settings: GatewaySettings, clock: FakeClock | None = None) -> tuple[ResponseCache, Metrics]:
    metrics = Metrics()
    clock = clock or FakeClock(1_800_000_000.0)
    return ResponseCache(settings, LocalStore(clock), metrics, clock=clock), metrics


def _count(metrics: Metrics, pid: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "gateway_response_cache_total", {"partner": pid, "result": result}
    )
    return value or 0.0


async def test_a_partner_without_cache_enabled_is_never_looked_up() -> None:
    settings = _settings()
    cache, metrics = _cache(settings)
    assert await cache.lookup(_admitted(settings, "umbrella")) is None
    assert (
        metrics.registry.get_sample_value(
            "gateway_response_cache_total", {"partner": "umbrella", "result": "miss"}
        )
        is None
    )


async def test_a_stored_answer_is_a_hit_for_the_same_params_of_the_same_partner() -> None:
    settings = _settings()
    cache, metrics = _cache(settings)
    first = await cache.lookup(_admitted(settings, "acme"))
    assert first is not None
    assert first.entry is None
    await cache.store(first, _message(), "req_up_1")
    again = await cache.lookup(_admitted(settings, "acme", rid="r2"))
    assert again is not None
    assert again.entry is not None
    assert again.entry.message == _message()
    assert again.entry.upstream_request_id == "req_up_1"
    assert (
        _count(metrics, "acme", "miss"),
        _count(metrics, "acme", "store"),
        _count(metrics, "acme", "hit"),
    ) == (1, 1, 1)
    other = await cache.lookup(_admitted(settings, "initech"))
    assert other is not None
    assert other.entry is None, "another partner's entry is not read"
    changed = await cache.lookup(_admitted(settings, "acme", _changed("max_tokens", 255)))
    assert changed is not None
    assert changed.entry is None


async def test_a_sharing_group_reads_each_others_entries_within_the_readers_ttl() -> None:
    settings = _settings(response_cache={"share": [["acme", "globex"]]})
    clock = FakeClock(1_800_000_000.0)
    cache, _ = _cache(settings, clock)
    lookup = await cache.lookup(_admitted(settings, "acme"))
    assert lookup is not None
    await cache.store(lookup, _message(), "req_up_1")  # acme's ttl: the default, an hour
    hit = await cache.lookup(_admitted(settings, "globex"))
    assert hit is not None
    assert hit.entry is not None
    clock.advance(61)
    stale = await cache.lookup(_admitted(settings, "globex"))
    assert stale is not None
    assert stale.entry is None, "older than globex's own ttl_s (60)"
    still = await cache.lookup(_admitted(settings, "acme"))
    assert still is not None
    assert still.entry is not None, "acme's ttl is an hour"
    assert (await cache.lookup(_admitted(settings, "initech"))).entry is None  # type: ignore[union-attr]


@pytest.mark.parametrize("stop", ["refusal", "pause_turn", None, "something_new"])
async def test_answers_that_are_not_answers_to_those_params_are_not_stored(stop: str | None) -> None:
    settings = _settings()
    cache, metrics = _cache(settings)
    lookup = await cache.lookup(_admitted(settings, "acme"))
    assert lookup is not None
    await cache.store(lookup, _message(stop=stop), "req_up")
    assert (await cache.lookup(_admitted(settings, "acme"))).entry is None  # type: ignore[union-attr]
    assert _count(metrics, "acme", "skip_stop_reason") == 1


@pytest.mark.parametrize(
    "stop", ["end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"]
)
async def test_answers_to_those_params_are_stored(stop: str) -> None:
    settings = _settings()
    cache, _ = _cache(settings)
    lookup = await cache.lookup(_admitted(settings, "acme"))
    assert lookup is not None
    await cache.store(lookup, _message(stop=stop), "req_up")
    assert (await cache.lookup(_admitted(settings, "acme"))).entry is not None  # type: ignore[union-attr]


async def test_an_entry_over_max_entry_bytes_is_not_stored() -> None:
    settings = _settings(response_cache={"max_entry_bytes": 2000, "compress_min_bytes": 10**9})
    cache, metrics = _cache(settings)
    lookup = await cache.lookup(_admitted(settings, "acme"))
    assert lookup is not None
    await cache.store(lookup, _message("x" * 3000), "req_up")
    assert _count(metrics, "acme", "skip_too_large") == 1
    await cache.store(lookup, _message("x" * 1000), "req_up")
    assert _count(metrics, "acme", "store") == 1


async def test_a_reload_turns_a_partners_cache_off() -> None:
    settings = _settings()
    cache, _ = _cache(settings)
    assert await cache.lookup(_admitted(settings, "acme")) is not None
    off = _settings(partners=[{"id": "acme", "api_key": {"env": "K"}}])
    cache.configure(off)
    assert await cache.lookup(_admitted(off, "acme")) is None


class _FailingRedis:
    """A Redis client whose every cache call fails with `error` (a refused connection, or an
    error reply); its `ping` fails too unless `ping_ok`."""

    def __init__(self, error: Exception, ping_ok: bool = False) -> None:
        self.error, self.ping_ok = error, ping_ok

    def register_script(self, _script: str) -> Any:
        async def run(**_kw: Any) -> Any:
            raise self.error

        return run

    async def hget(self, *_a: Any) -> Any:
        raise self.error

    async def ping(self) -> Any:
        if not self.ping_ok:
            raise self.error
        return True


async def test_redis_failing_is_a_miss_that_stores_nothing_and_reports_to_the_shared_health() -> None:
    settings = _settings(redis={})
    redis = _FailingRedis(RedisConnectionError("refused"))
    health = RedisHealth(redis, probe_interval_s=60)
    metrics = Metrics()
    cache = ResponseCache(settings, RedisStore(redis, "p"), metrics, health=health)
    try:
        lookup = await cache.lookup(_admitted(settings, "acme"))
        assert lookup is not None
        assert lookup.entry is None
        assert not lookup.storable
        assert health.down, "a refused connection: the shared health says down"
        assert cache.degraded
        await cache.store(lookup, _message(), "req_up")
        again = await cache.lookup(_admitted(settings, "acme"))
        assert again is not None
        assert again.entry is None
        assert _count(metrics, "acme", "unavailable") == 2
        assert _count(metrics, "acme", "skip_unavailable") == 1
    finally:
        await health.aclose()


def test_a_hit_is_a_valid_response_with_zero_attempts_and_the_original_call() -> None:
    settings = _settings()
    adm = _admitted(settings, "acme", rid="r9")
    entry = Entry(_message(), "req_up_1", 1_800_000_000.0, 1_800_003_600.0)
    cost = unbilled("v1").doc()
    doc = orjson.loads(
        cached_response(entry, adm, Timings(received_at=1_800_000_100.0), 1_800_000_099_000, cost)
    )
    validate("response", doc)
    assert doc["cost"] == cost
    assert (doc["cost"]["nano_usd"], doc["cost"]["reason"]) == (0, "cache_hit")
    assert doc["cached"] is True
    assert doc["attempts"] == 0
    assert doc["upstream_request_id"] is None
    assert doc["cached_from"] == {"upstream_request_id": "req_up_1", "cached_at": "2027-01-15T08:00:00.000Z"}
    assert doc["message"] == _message()
    assert doc["usage"] == _message()["usage"]
    assert doc["request_id"] == "r9"
    assert doc["metadata"] == {"trace": "r9"}
    assert doc["timings"]["queue_ms"] == 0
    assert doc["timings"]["upstream_ms"] == 0


def test_lookup_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Lookup("k", "acme", 1.0).key = "x"  # type: ignore[misc]


# -- config ----------------------------------------------------------------------------------


def _error(cfg: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(cfg)
    return str(caught.value)


def test_cache_settings_default_off_with_sane_bounds() -> None:
    s = parse_config({"partners": [{"id": "acme", "api_key": {"env": "K"}}]})
    assert s.partners[0].cache.enabled is False
    assert s.partners[0].cache.ttl_s is None
    rc = s.response_cache
    assert (rc.ttl_s, rc.max_entry_bytes, rc.share) == (3600, 1024 * 1024, [])
    assert rc.max_entry_bytes <= rc.max_bytes
    assert rc.max_entry_bytes <= rc.local_max_bytes


@pytest.mark.parametrize(
    ("extra", "partner_cache", "expected"),
    [
        ({}, {"enabled": True, "ttl_s": 0}, "partners[acme].cache.ttl_s: Input should be greater than 0"),
        (
            {},
            {"enabld": True},
            "partners[acme].cache.enabld: is not a known setting; did you mean 'enabled'?",
        ),
        (
            {"response_cache": {"max_entry_bytes": 10, "max_bytes": 5}},
            {},
            "max_entry_bytes (10) must not exceed max_bytes (5)",
        ),
        (
            {"response_cache": {"share": [["acme", "nobody"]]}},
            {},
            "response_cache.share[0]: 'nobody' is not a configured partner id",
        ),
        ({"response_cache": {"share": [["acme"]]}}, {}, "share[0] must name at least two different partners"),
        (
            {"response_cache": {"share": [["acme", "globex"], ["acme", "initech"]]}},
            {},
            "partner 'acme' is in share[0] and share[1]",
        ),
        ({"response_cache": {"ttl_s": -1}}, {}, "response_cache.ttl_s: Input should be greater than 0"),
    ],
)
def test_cache_settings_errors_name_the_setting(
    extra: dict[str, Any], partner_cache: dict[str, Any], expected: str
) -> None:
    partners = [
        {"id": p, "api_key": {"env": "K"}, **({"cache": partner_cache} if p == "acme" else {})}
        for p in ("acme", "globex", "initech")
    ]
    assert expected in _error({"partners": partners, **extra})


def test_config_advice_for_the_cache() -> None:
    s = _settings(response_cache={"share": [["acme", "umbrella"]]})
    found = "\n".join(warnings(s))
    assert "response cache is on for acme, globex, initech but there is no redis section" in found
    assert "response_cache.share[0] names 'umbrella', whose cache is not enabled" in found
    with_redis = "\n".join(warnings(_settings(redis={})))
    assert "response cache" not in with_redis


# -- what must never be served ------------------------------------------------------------


def _tool_error_message(inner: str, code: str) -> dict[str, Any]:
    body = _message()
    body["content"] = [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
        {
            "type": inner.removesuffix("_error"),
            "tool_use_id": "srvtoolu_1",
            "content": {"type": inner, "error_code": code},
        },
        {"type": "text", "text": "I could not search right now."},
    ]
    return body


@pytest.mark.parametrize(
    ("inner", "code"),
    [
        ("web_search_tool_result_error", "too_many_requests"),
        ("web_fetch_tool_result_error", "unavailable"),
        ("code_execution_tool_result_error", "unavailable"),
        ("bash_code_execution_tool_result_error", "execution_time_exceeded"),
    ],
)
async def test_an_answer_whose_server_tool_failed_is_not_stored(inner: str, code: str) -> None:
    settings = _settings()
    cache, metrics = _cache(settings)
    lookup = await cache.lookup(_admitted(settings, "acme"))
    assert lookup is not None
    await cache.store(lookup, _tool_error_message(inner, code), "req_up")
    assert (await cache.lookup(_admitted(settings, "acme"))).entry is None  # type: ignore[union-attr]
    assert _count(metrics, "acme", "skip_tool_error") == 1


@pytest.mark.parametrize(
    "message",
    [
        {"usage": 5},
        {"usage": "xyz", "content": [], "stop_reason": "end_turn"},
        {"usage": [["input_tokens", 1]], "content": [], "stop_reason": "end_turn"},
        {"usage": {}, "content": "text", "stop_reason": "end_turn"},
        {**_message(), "stop_reason": "refusal"},
    ],
)
async def test_an_entry_that_is_not_a_storable_answer_is_a_miss(message: dict[str, Any]) -> None:
    """Redis' contents are not trusted: what a hit would publish and meter must be an answer
    this gateway stores, or the hit crashes the partition (and again after each restart)."""
    settings = _settings()
    clock = FakeClock(1_800_000_000.0)
    cache, metrics = _cache(settings, clock)
    adm = _admitted(settings, "acme")
    key = cache_key(scope_of("acme", []), adm.params)
    now = clock()
    await cache.backend.put(key, encode(Entry(message, None, now, now + 60), 1024), now, now + 60, 10**6)
    lookup = await cache.lookup(adm)
    assert lookup is not None
    assert lookup.entry is None
    assert _count(metrics, "acme", "miss") == 1


async def test_a_cache_only_redis_error_is_a_miss_that_keeps_the_shared_health_up() -> None:
    """WRONGTYPE on the cache's keys is the cache's fault: the limits, budgets and replay checks
    of every partner must not fall back to local state because of it."""
    settings = _settings(redis={})
    redis = _FailingRedis(
        RedisResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), ping_ok=True
    )
    health = RedisHealth(redis, probe_interval_s=60)
    metrics = Metrics()
    cache = ResponseCache(settings, RedisStore(redis, "p"), metrics, health=health)
    try:
        lookup = await cache.lookup(_admitted(settings, "acme"))
        assert lookup is not None
        assert lookup.entry is None
        await cache.store(Lookup(lookup.key, "acme", 60.0), _message(), "req_up")
        assert not health.down
        assert health.state == "healthy"
        errors = metrics.registry.get_sample_value(
            "gateway_internal_errors_total", {"partner": "acme", "where": "response_cache"}
        )
        assert errors == 2
        results = {
            r: metrics.registry.get_sample_value(
                "gateway_response_cache_total", {"partner": "acme", "result": r}
            )
            for r in ("unavailable", "skip_unavailable")
        }
        assert results == {"unavailable": 1.0, "skip_unavailable": 1.0}, "the lookup and the store, counted"
    finally:
        await health.aclose()


def test_an_entry_that_inflates_past_the_bound_is_corrupt() -> None:
    """A zlib bomb put in Redis (a few KB inflating to 100 MB) is not inflated whole."""
    blob = encode(Entry({"content": [], "usage": {}}, None, 1.0, 2.0), 10**9)
    bomb = zlib.compress(b"{" + b" " * (100 * 1024 * 1024), 9)
    with pytest.raises(CorruptEntry, match="inflating past"):
        decode(bytes([1]) + blob[1:17] + bomb)


async def test_an_entry_larger_than_the_whole_store_evicts_nothing() -> None:
    store = LocalStore(lambda: 100.0)
    cap = 4 * (1000 + ENTRY_OVERHEAD_BYTES)
    for i in range(4):
        assert (await store.put(f"k{i}", bytes(1000), 100.0, 200.0, cap)).result == STORED
    assert (await store.put("huge", bytes(cap), 100.0, 200.0, cap)).result == NO_ROOM
    assert [await store.get(f"k{i}") is not None for i in range(4)] == [True] * 4


def test_a_ttl_beyond_a_year_is_refused() -> None:
    with pytest.raises(ConfigError, match="ttl_s"):
        parse_config({"response_cache": {"ttl_s": 1e17}, "partners": []})
