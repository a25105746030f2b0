"""The console's view of a running gateway, as one JSON document (`GET /admin/api/state`).

Read-only: it looks at the parts the gateway already has (settings, registry,
metrics, limiter, budgets, the ingest loop's partition writers and consumer)
and never changes them. The HTML page renders exactly this document, so what
the page shows is what the API says.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from service.admission.budget import NANO_PER_USD, Amount, periods
from service.config.settings import LimitSettings
from service.contracts.outcomes import utc_iso
from service.version import version

if TYPE_CHECKING:
    from service.admin.console import Console
    from service.app import Gateway


DIMENSIONS = ("rpm", "itpm", "otpm")


def _limits(limits: LimitSettings) -> dict[str, int | None]:
    return {dim: getattr(limits, dim) for dim in DIMENSIONS}


def _effective(own: LimitSettings, org: LimitSettings, share: float) -> dict[str, Any]:
    """The most the partner can get per dimension (its own limit and the org's, whichever is
    lower), and its weighted share of the org limit when every partner is busy."""
    out: dict[str, Any] = {}
    for dim in DIMENSIONS:
        mine, whole = getattr(own, dim), getattr(org, dim)
        candidates = [v for v in (mine, whole) if v is not None]
        fair = None if whole is None else round(whole * share, 1)
        out[dim] = {"max": min(candidates) if candidates else None, "fair_share": fair}
    return out


def _gauge(gauge: Any, **labels: str) -> float:
    """The current value of one labelled child of a gauge (0 when it has none)."""
    for family in gauge.collect():
        for s in family.samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def _limiter(gw: Gateway) -> dict[str, Any]:
    limiter = gw.scheduler.limiter
    backend = gw.settings.limiter_backend
    state = "local" if backend == "local" else ("degraded" if gw.redis_degraded else "shared")
    capacity = {"org": gw.settings.org_limits} | {p.id: p.limits for p in gw.settings.partners}
    buckets = []
    for (scope, dim), level in sorted(limiter.levels().items()):
        cap = capacity.get(scope)
        buckets.append(
            {
                "scope": scope,
                "bucket": dim,
                "available": round(level, 1),
                "capacity": getattr(cap, dim) if cap is not None else None,
            }
        )
    return {"backend": backend, "state": state, "buckets": buckets}


def _upstream(gw: Gateway) -> dict[str, float]:
    out: dict[str, float] = {}
    m = gw.metrics
    for family in (*m.upstream_remaining_requests.collect(), *m.upstream_remaining_tokens.collect()):
        for s in family.samples:
            out["requests" if "direction" not in s.labels else f"{s.labels['direction']}_tokens"] = s.value
    return out


def _partitions(gw: Gateway) -> dict[str, list[dict[str, Any]]]:
    """Each owned request partition's exactly-once state, by partner."""
    ingest = gw.ingest
    consumer = getattr(ingest, "_consumer", None)
    registry = gw.registry
    out: dict[str, list[dict[str, Any]]] = {}
    if consumer is None:
        return out
    assigned = consumer.assignment()
    paused = consumer.paused()
    writers = ingest.ownership.writers
    for tp in sorted(assigned | set(writers), key=lambda t: (t.topic, t.partition)):
        writer = writers.get(tp)
        ledger = writer.ledger if writer is not None else None
        high = consumer.highwater(tp) if tp in assigned else None
        commit = ledger.low_watermark if ledger is not None else None
        row = {
            "topic": tp.topic,
            "partition": tp.partition,
            "paused": tp in paused,
            "writer": writer.state.value if writer is not None else None,
            "ready": tp in ingest.ownership.ready,
            "commit": commit,
            "next_offset": ledger.next_offset if ledger is not None else None,
            "high_watermark": high,
            "lag": max(0, high - commit) if high is not None and commit is not None and commit >= 0 else None,
            "window": ledger.window if ledger is not None else 0,
            "claims": len(ledger.claims) if ledger is not None else 0,
            "in_flight": ledger.in_flight if ledger is not None else 0,
        }
        out.setdefault(registry.partner_id_for_topic(tp.topic), []).append(row)
    return out


async def _budget(gw: Gateway, pid: str, now: float) -> list[dict[str, Any]]:
    """Used and remaining per period: from Redis when budgets are shared (every replica's
    spend), else this replica's counters (which mirror Redis while it is unreachable)."""
    partner = gw.registry.by_id.get(pid)
    if partner is None:
        return []
    rows = []
    for p in periods(partner.settings.budget, now):
        used = gw.budgets.local.used(pid, p)
        if gw.budgets.shared is not None and gw.redis is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                raw = await gw.redis.hgetall(gw.budgets.shared.key(pid, p))
                used = Amount(int(raw.get(b"tokens", 0)), int(raw.get(b"nusd", 0)))
        usd_used = used.nusd / NANO_PER_USD
        usd_limit = None if p.nusd_limit is None else p.nusd_limit / NANO_PER_USD
        rows.append(
            {
                "period": p.name,
                "label": p.label,
                "tokens_used": used.tokens,
                "tokens_limit": p.tokens_limit,
                "tokens_remaining": None if p.tokens_limit is None else max(0, p.tokens_limit - used.tokens),
                "usd_used": round(usd_used, 6),
                "usd_limit": usd_limit,
                "usd_remaining": None if usd_limit is None else round(max(0.0, usd_limit - usd_used), 6),
                "resets_at": utc_iso(p.ends_at),
            }
        )
    return rows


async def snapshot(gw: Gateway, console: Console) -> dict[str, Any]:
    """Everything the console shows, for every partner and the whole service."""
    now = time.time()
    gw.metrics.refresh()  # the gauges of outside state, as a scrape would see them
    settings = gw.settings
    parts = _partitions(gw)
    outstanding = gw.ingest.outstanding()
    spend = await console.tallies.spend()
    dead = await console.tallies.dead_letters_last_hour()
    pauses = console.pauses
    weights = sum(p.weight for p in settings.partners) or 1.0
    partners = []
    for ps in settings.partners:
        pid = ps.id
        hold = pauses.holds.get(pid)
        in_flight = gw.metrics.in_flight_now(pid)
        rows = parts.get(pid, [])
        lags = [r["lag"] for r in rows if r["lag"] is not None]
        partners.append(
            {
                "id": pid,
                "enabled": ps.enabled,
                "state": "disabled" if not ps.enabled else (hold.mode if hold is not None else "running"),
                "hold": None
                if hold is None
                else {"by": hold.by, "replica": hold.replica, "at": utc_iso(hold.at)},
                "weight": ps.weight,
                "max_concurrency": ps.max_concurrency,
                "max_queue": ps.max_queue,
                "limits": _limits(ps.limits),
                "effective_limits": _effective(ps.limits, settings.org_limits, ps.weight / weights),
                "in_flight": in_flight,
                "queued": max(0, outstanding.get(pid, 0) - in_flight),
                "held": pauses.waiting(pid),
                "partitions": {"owned": len(rows), "paused": sum(1 for r in rows if r["paused"])},
                "lag": sum(lags) if lags else None,
                "budget": await _budget(gw, pid, now),
                "budget_shared": gw.budgets.shared is not None,
                "spend_usd": {
                    "today": _rounded(spend["today"].get(pid, {})),
                    "month": _rounded(spend["month"].get(pid, {})),
                },
                "dead_letters_last_hour": dict(sorted(dead.get(pid, {}).items())),
                "exactly_once": rows,
            }
        )
    return {
        "generated_at": utc_iso(now),
        "version": version(),
        "replica": gw.ingest.owner,
        "ready": gw.readiness()[0],
        "exactly_once": settings.kafka.exactly_once,
        "org_limits": _limits(settings.org_limits),
        "limiter": _limiter(gw),
        "upstream_ratelimit_remaining": _upstream(gw),
        "pause_scope": "shared (redis)" if pauses.shared else "this replica only (no redis)",
        "replicas": await console.replicas.list(),
        "partners": partners,
    }


def _rounded(by_model: dict[str, float]) -> dict[str, Any]:
    return {
        "total": round(sum(by_model.values()), 6),
        "by_model": {m: round(v, 6) for m, v in sorted(by_model.items())},
    }
