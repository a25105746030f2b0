"""Issue 12, the admin console, in a real browser (headless Chromium) against a running gateway
on the real broker, with the Claude simulator over HTTP (and Redis for the shared state).

- without the token there is only a login form (and a 401 for the API); a wrong token is
  refused and never shown back; the token itself appears in no page, cookie or API answer;
- the page shows what the JSON API says: each partner's state, weight, limits, in-flight,
  queued, partitions, spend by model, budget used and remaining, dead letters by reason over
  the last hour, the exactly-once state of each partition; the limiter state and replicas;
- pause from the page holds a partner's requests (its partitions end up paused by
  backpressure) while another partner is served; nothing is dead-lettered; resume delivers
  every held request exactly once; drain lets the requests already in memory finish and holds
  the later ones; each action is audited;
- with Redis, a pause made on one replica holds the partner on the other one too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from service.admin import console
from service.app import Gateway
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.browser import Browser, browser
from tests.support.gateway import World, collect, make_world, produce, request

pytestmark = pytest.mark.integration
__all__ = ["browser"]

TOKEN = "adm-" + "5f0c2e9a7b1d4c38a6e2"


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex"], partitions=2)


def _admin(world: World) -> dict[str, Any]:
    token_file = world.key_dir / "admin.token"
    token_file.write_text(TOKEN + "\n")
    return {"admin": {"token": {"file": str(token_file)}}}


def _partners(world: World, **acme: Any) -> list[dict[str, Any]]:
    partners = world.settings_dict("x")["partners"]
    partners[0] = {**partners[0], **acme}
    return partners


@asynccontextmanager
async def running(world: World, sim_url: str, **overrides: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(world.settings(sim_url, **_admin(world), **overrides))
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await _until(lambda: _ready(gateway, task), "the gateway is ready")
        yield gateway
    finally:
        stop.set()
        await task


async def _ready(gateway: Gateway, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()
        raise AssertionError("the gateway stopped")
    return gateway.readiness()[0] and len(gateway.ingest.ownership.ready) == 4


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def _base(gateway: Gateway) -> str:
    assert gateway.http is not None
    assert gateway.http.port
    return f"http://127.0.0.1:{gateway.http.port}"


async def api(gateway: Gateway, method: str, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(method, _base(gateway) + path, headers=headers) as r:
        return r.status, orjson.loads(await r.read())


def _records_committed(rows: list[dict[str, Any]]) -> int:
    """Records committed over a partner's `exactly_once` rows. A partition that has had no
    record yet (keyless records go to partitions at random: all may go to one) shows commit
    -1, nothing committed: it counts 0."""
    return sum(max(0, r["commit"]) for r in rows)


async def _committed(gateway: Gateway, partner: str, offsets: int) -> bool:
    """The partner's partition writers have committed `offsets` records in all."""
    _, state = await api(gateway, "GET", "/admin/api/state")
    rows = next(p for p in state["partners"] if p["id"] == partner)["exactly_once"]
    return _records_committed(rows) >= offsets


async def login(b: Browser, gateway: Gateway, token: str = TOKEN) -> None:
    await b.get(_base(gateway) + "/admin")
    await b.type("#token", token)
    await b.submit("#login")


def _sim(world: World) -> SimulatorConfig:
    return SimulatorConfig.model_validate(
        {"api_keys": world.keys, "seed": 3, "latency": {"distribution": "fixed", "fixed_s": 0.01}}
    )


def _requests(world: World, partner: str, n: int) -> list[tuple[str, bytes | None, bytes | None]]:
    return [(world.request_topic(partner), None, request(f"{partner}-{i}")) for i in range(n)]


def _field(section: str, name: str) -> str:
    return f'section#partner-{section} [data-field="{name}"]'


# -- login and what the page shows -------------------------------------------------------------


async def _status_of_raw(gateway: Gateway, request: bytes, timeout_s: float = 5) -> int:
    """The status an HTTP request sent as these bytes gets (a body may be cut short)."""
    assert gateway.http is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return int((await reader.readline()).split()[1])
    finally:
        writer.close()


FORM = b"Host: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: "


async def test_login_is_required_and_the_token_never_shows(
    world: World, browser: Browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "FORM_TIMEOUT_S", 1.0)
    async with SimulatorServer(_sim(world)) as sim, running(world, sim.url) as gateway:
        assert (await api(gateway, "GET", "/admin/api/state", token=None))[0] == 401
        assert (await api(gateway, "GET", "/admin/api/state", token="wrong-token-value"))[0] == 401
        assert (await api(gateway, "POST", "/admin/api/partners/acme/pause", token=None))[0] == 401
        assert "acme" not in gateway.console.pauses.holds
        # an outsider's bodies are not waited for (each was buffered, up to 1 MiB, with no time
        # limit, before any check: 300 half-sent ones took the RSS from 73 to 441 MB)
        action = b"POST /admin/partners/acme/pause HTTP/1.1\r\n" + FORM
        assert await _status_of_raw(gateway, action + b"100\r\n\r\n") == 403, "no session: before the body"
        assert await _status_of_raw(gateway, action + b"1000000\r\n\r\n") == 413, "before the session check"
        login_ = b"POST /admin/login HTTP/1.1\r\n" + FORM
        assert await _status_of_raw(gateway, login_ + b"20000\r\n\r\n" + b"t" * 20000) == 413
        assert await _status_of_raw(gateway, login_ + b"100\r\n\r\ntoken=abc") == 408

        await browser.get(_base(gateway) + "/admin")
        assert await browser.call(lambda d: len(d.find_elements("css selector", "section.partner"))) == 0
        await login(browser, gateway, token="not-the-token-123")
        assert "not the admin token" in await browser.text("#login-error")
        assert "not-the-token-123" not in await browser.source()

        await login(browser, gateway)
        assert await browser.text("#replica") == gateway.ingest.owner
        page = await browser.source()
        cookies = await browser.call(lambda d: d.get_cookies())
        _, state = await api(gateway, "GET", "/admin/api/state")
        assert TOKEN not in page
        assert all(TOKEN not in c["value"] for c in cookies)
        assert [c["httpOnly"] for c in cookies if c["name"] == "gateway_admin"] == [True]
        assert TOKEN not in orjson.dumps(state).decode()

        # a form action with the session cookie but without the page's CSRF token is refused
        session = {c["name"]: c["value"] for c in cookies}
        async with (
            aiohttp.ClientSession(cookies=session) as s,
            s.post(_base(gateway) + "/admin/partners/acme/pause", data={"csrf": "forged"}) as r,
        ):
            assert r.status == 403
        assert "acme" not in gateway.console.pauses.holds

        await browser.submit("#logout")
        assert await browser.call(lambda d: len(d.find_elements("css selector", "#token"))) == 1


async def test_the_page_shows_what_the_api_says(world: World, browser: Browser) -> None:
    overrides = {
        "partners": _partners(world, weight=3, limits={"rpm": 600}, budget={"usd_per_day": 5}),
        "org_limits": {"rpm": 1000, "itpm": 1_000_000},
    }
    async with SimulatorServer(_sim(world)) as sim, running(world, sim.url, **overrides) as gateway:
        messages = [(world.request_topic("acme"), None, request(f"a-{i}")) for i in range(6)]
        messages += [(world.request_topic("globex"), None, request(f"g-{i}")) for i in range(3)]
        messages += [(world.request_topic("globex"), None, b"{not json")] * 2
        await produce(world.bootstrap, messages)
        out = await collect(world, expected=11, timeout_s=60)
        assert out.total == 11
        # readers see a transaction's outcomes once its markers are written, which can be a
        # moment before the writer has read its commit's answer and moved its commit point
        await _until(lambda: _committed(gateway, "acme", 6), "acme's writers committed all 6", timeout_s=15)
        await gateway.console.tallies.sample()  # the console's sampler runs every 5 s; now, here

        await login(browser, gateway)
        status, state = await api(gateway, "GET", "/admin/api/state")
        assert status == 200
        by_id = {p["id"]: p for p in state["partners"]}
        acme, globex = by_id["acme"], by_id["globex"]

        # the API itself tells the truth
        assert acme["weight"] == 3
        assert acme["limits"]["rpm"] == 600
        assert acme["effective_limits"]["rpm"] == {"max": 600, "fair_share": 750.0}
        assert globex["dead_letters_last_hour"] == {"malformed_json": 2}
        assert acme["dead_letters_last_hour"] == {}
        assert acme["spend_usd"]["today"]["total"] > 0
        assert list(acme["spend_usd"]["today"]["by_model"]) == ["claude-haiku-4-5"]
        [day] = acme["budget"]
        assert day["usd_limit"] == 5
        assert 0 < day["usd_used"] < 5
        assert day["usd_remaining"] == pytest.approx(5 - day["usd_used"])
        assert {r["partition"] for r in acme["exactly_once"]} == {0, 1}
        # a partition no record went to has committed nothing: commit -1, no lag to tell
        assert _records_committed(acme["exactly_once"]) == 6
        assert all(r["lag"] == (None if r["commit"] < 0 else 0) for r in acme["exactly_once"])
        assert all(r["claims"] == 0 for r in acme["exactly_once"])
        assert state["limiter"]["state"] == "local"
        assert [r["id"] for r in state["replicas"]] == [gateway.ingest.owner]

        # the page says the same
        assert await browser.text("#limiter-state") == "local"
        for p in (acme, globex):
            pid = p["id"]
            assert await browser.attr(f"section#partner-{pid}", "data-state") == "running"
            assert await browser.text(_field(pid, "state")) == "running"
            assert await browser.text(_field(pid, "weight")) == f"{p['weight']:g}"
            assert await browser.text(_field(pid, "in_flight")) == str(p["in_flight"])
            assert await browser.text(_field(pid, "queued")) == str(p["queued"])
            assert await browser.text(_field(pid, "partitions")) == str(p["partitions"]["owned"])
            assert await browser.text(_field(pid, "paused_partitions")) == str(p["partitions"]["paused"])
            spend = await browser.text(_field(pid, "spend_today"))
            assert float(spend.replace(",", "") if spend != "—" else 0) == pytest.approx(
                p["spend_usd"]["today"]["total"], abs=1e-6
            )
            reasons = await browser.texts(f"section#partner-{pid} table.dead-letters td.reason")
            counts = await browser.texts(f"section#partner-{pid} table.dead-letters td.count")
            assert dict(zip(reasons, map(int, counts), strict=True)) == p["dead_letters_last_hour"]
            commits = await browser.texts(f"section#partner-{pid} table.eos td.commit")
            assert [int(c) if c != "—" else -1 for c in commits] == [r["commit"] for r in p["exactly_once"]]
        used = await browser.text("section#partner-acme table.budget td.usd_used")
        assert float(used) == pytest.approx(day["usd_used"], abs=1e-6)
        left = await browser.text("section#partner-acme table.budget td.usd_remaining")
        assert float(left) == pytest.approx(day["usd_remaining"], abs=1e-6)
        rpm = await browser.texts("section#partner-acme table.limits td.fair_share")
        assert rpm[0] == "750"
        if shot := os.environ.get("ADMIN_CONSOLE_SCREENSHOT"):  # how docs/admin-console.png is made
            await browser.submit("#pause-acme")
            await browser.screenshot(Path(shot))


# -- actions ------------------------------------------------------------------------------------


async def _states(gateway: Gateway) -> dict[str, dict[str, Any]]:
    _, state = await api(gateway, "GET", "/admin/api/state")
    return {p["id"]: p for p in state["partners"]}


async def test_pause_resume_and_drain_from_the_page(world: World, browser: Browser) -> None:
    # acme's fetch cap is small (max_queue 4): a pause holds 4 requests, the rest stay in Kafka
    overrides = {"partners": _partners(world, max_queue=4, max_concurrency=2)}
    async with SimulatorServer(_sim(world)) as sim, running(world, sim.url, **overrides) as gateway:
        await login(browser, gateway)
        await browser.submit("#pause-acme")
        assert await browser.attr("section#partner-acme", "data-state") == "paused"
        assert await browser.text("#notice") == "acme paused"

        await produce(
            world.bootstrap, [(world.request_topic("acme"), None, request(f"a-{i}")) for i in range(12)]
        )
        await produce(
            world.bootstrap, [(world.request_topic("globex"), None, request(f"g-{i}")) for i in range(5)]
        )
        served = await collect(world, expected=5, timeout_s=60, settle_s=2)
        assert served.total == 5
        assert not served.dead_letters
        assert {d["partner"] for d in served.responses} == {"globex"}

        async def held() -> bool:
            acme = (await _states(gateway))["acme"]
            return acme["held"] == 4 and acme["partitions"]["paused"] == acme["partitions"]["owned"] == 2

        await _until(held, "acme's 4 fetched requests are held and both its partitions paused")
        await browser.get(_base(gateway) + "/admin")
        assert await browser.text(_field("acme", "held")) == "4"
        assert await browser.text(_field("acme", "paused_partitions")) == "2"
        assert await browser.text(_field("acme", "in_flight")) == "0"

        # drain: the 4 in memory finish; the later ones are held, not fetched past the cap
        await browser.submit("#drain-acme")
        assert await browser.attr("section#partner-acme", "data-state") == "draining"
        drained = await collect(world, expected=9, timeout_s=60, settle_s=3)
        acme_ids = sorted(d["request_id"] for d in drained.responses if d["partner"] == "acme")
        assert len(acme_ids) == 4
        assert not drained.dead_letters
        await _until(held, "the next 4 of acme are held while it stays drained")

        await browser.submit("#resume-acme")
        assert await browser.attr("section#partner-acme", "data-state") == "running"
        done = await collect(world, expected=17, timeout_s=60, settle_s=2)
        assert done.total == 17
        assert not done.dead_letters
        assert sorted(done.request_ids().values()) == [1] * 17  # each exactly once

        events = [(e, ctx.get("partner")) for e, ctx in gateway.audit.emitted if e.startswith("partner_")]
        assert events[-3:] == [
            ("partner_paused", "acme"),
            ("partner_drained", "acme"),
            ("partner_resumed", "acme"),
        ]


async def test_a_pause_is_shared_across_replicas_through_redis(world: World, redis_url: str) -> None:
    overrides = {"redis": {"url": redis_url, "key_prefix": f"cg-{world.tag}"}, "limiter_backend": "redis"}
    async with (
        SimulatorServer(_sim(world)) as sim,
        running_two(world, sim.url, **overrides) as (one, two),
    ):
        status, doc = await api(one, "POST", "/admin/api/partners/acme/pause")
        assert status == 200
        assert doc == {"partner": "acme", "state": "paused", "by": "admin"}

        async def seen_by_two() -> bool:
            return (await _states(two))["acme"]["state"] == "paused"

        await _until(seen_by_two, "the other replica holds acme too", timeout_s=10)
        _, state = await api(two, "GET", "/admin/api/state")
        assert state["pause_scope"].startswith("shared")
        assert state["limiter"]["state"] == "shared"
        assert {r["id"] for r in state["replicas"]} == {one.ingest.owner, two.ingest.owner}

        await produce(
            world.bootstrap, [(world.request_topic("acme"), None, request(f"a-{i}")) for i in range(6)]
        )
        await produce(
            world.bootstrap, [(world.request_topic("globex"), None, request(f"g-{i}")) for i in range(4)]
        )
        out = await collect(world, expected=4, timeout_s=60, settle_s=3)
        assert {d["partner"] for d in out.responses} == {"globex"}
        assert not out.dead_letters

        status, _ = await api(two, "POST", "/admin/api/partners/acme/resume")
        assert status == 200
        out = await collect(world, expected=10, timeout_s=60, settle_s=1)
        assert out.total == 10
        assert not out.dead_letters


@asynccontextmanager
async def running_two(world: World, sim_url: str, **overrides: Any) -> AsyncIterator[tuple[Gateway, Gateway]]:
    gateways = [Gateway(world.settings(sim_url, **_admin(world), **overrides)) for _ in range(2)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(g.run(stop)) for g in gateways]

    async def ready() -> bool:
        for _g, t in zip(gateways, tasks, strict=True):
            if t.done():
                t.result()
        owned = sum(len(g.ingest.ownership.ready) for g in gateways)
        return owned == 4 and all(g.readiness()[0] for g in gateways)

    try:
        await _until(ready, "both replicas own the 4 partitions between them")
        yield gateways[0], gateways[1]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
