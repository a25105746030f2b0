"""`make demo`'s report (scripts/demo.py): what was sent and what came back, the summary tables,
and what the simulator and the gateway's /metrics say. Standard library, orjson and
prometheus_client only; demo.py imports it as a sibling script."""

from __future__ import annotations

import base64
import contextlib
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Sent:
    """One message a partner produced, and what the demo expects for it."""

    partner: str
    key: str
    value: bytes
    expect: str  # "response" or a dead-letter reason


@dataclass
class Outcome:
    partner: str
    kind: str  # "response" or "deadletter"
    doc: dict[str, Any]


@dataclass
class Collected:
    by_key: dict[str, list[Outcome]] = field(default_factory=lambda: defaultdict(list))
    unmatched: list[Outcome] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.by_key.values()) + len(self.unmatched)


def outcome_key(kind: str, doc: dict[str, Any]) -> str | None:
    if kind == "response":
        rid = doc.get("request_id")
        return rid if isinstance(rid, str) else None
    key_b64 = (doc.get("original") or {}).get("key_b64")
    if isinstance(key_b64, str):
        with contextlib.suppress(ValueError):
            return base64.b64decode(key_b64).decode()
    return None


def table(headers: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> str:
    """A plain text table; columns in `right` are right-aligned."""
    right_cols = set(right)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in right_cols else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  " + "  ".join(out).rstrip()

    rule = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _iso_ms(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp() * 1000
    except ValueError:
        return None


def _e2e_ms(o: Outcome) -> float | None:
    """Request timestamp (the partner's produce time) to outcome, in ms."""
    if o.kind == "response":
        t = o.doc.get("timings") or {}
        start, end = t.get("request_timestamp_ms"), _iso_ms(t.get("completed_at"))
        if isinstance(start, int | float) and end is not None:
            return max(0.0, end - start)
        total = t.get("total_ms")
        return float(total) if isinstance(total, int | float) else None
    start = (o.doc.get("original") or {}).get("timestamp_ms")
    end = _iso_ms(o.doc.get("failed_at"))
    return max(0.0, end - start) if isinstance(start, int | float) and end is not None else None


def summarise(
    traffic: list[Sent], got: Collected, partners: Sequence[str], dropped: Collection[str] = ()
) -> bool:
    """Print the summary tables (a row per partner in `partners`, in that order); return whether
    every request got exactly one outcome.
    `dropped`: request ids whose call the simulator did, then dropped the connection: such a
    request's `outcome_unknown` is what the gateway must answer, not a surprise."""
    sent: Counter[str] = Counter(s.partner for s in traffic)
    responses: Counter[str] = Counter()
    dead: dict[str, Counter[str]] = defaultdict(Counter)
    retries: Counter[str] = Counter()
    nano_usd: Counter[str] = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    unexpected: list[str] = []
    unknown: list[str] = []
    for s in traffic:
        for o in got.by_key.get(s.key, [])[:1]:
            if o.kind == "response":
                responses[s.partner] += 1
                retries[s.partner] += max(0, int(o.doc.get("attempts") or 1) - 1)
                nano_usd[s.partner] += (o.doc.get("cost") or {}).get("nano_usd") or 0
                ms = _e2e_ms(o)
                if ms is not None:
                    latencies[s.partner].append(ms)
                got_what = "response"
            else:
                reason = str(o.doc.get("reason"))
                dead[s.partner][reason] += 1
                got_what = reason
            if got_what == "outcome_unknown" and s.expect == "response" and s.key in dropped:
                unknown.append(s.key)
            elif got_what != s.expect:
                unexpected.append(f"{s.key}: expected {s.expect}, got {got_what}")

    missing = [s.key for s in traffic if not got.by_key.get(s.key)]
    duplicated = [k for k, v in got.by_key.items() if len(v) > 1]

    print()
    print("Per partner (latency: partner's produce timestamp -> response, over responses;")
    print("cost: the responses' cost.nano_usd, also on the claude.usage topic)")
    rows = []
    for pid in partners:
        lat = latencies[pid]
        rows.append([
            pid, str(sent[pid]), str(responses[pid]), str(sum(dead[pid].values())),
            str(retries[pid]), fmt_ms(percentile(lat, 50)), fmt_ms(percentile(lat, 99)),
            f"{nano_usd[pid] / 1e9:.6f}",
        ])  # fmt: skip
    all_lat = [x for v in latencies.values() for x in v]
    rows.append([
        "total", str(sum(sent.values())), str(sum(responses.values())),
        str(sum(sum(c.values()) for c in dead.values())), str(sum(retries.values())),
        fmt_ms(percentile(all_lat, 50)), fmt_ms(percentile(all_lat, 99)),
        f"{sum(nano_usd.values()) / 1e9:.6f}",
    ])  # fmt: skip
    headers = ["partner", "sent", "responses", "dead letters", "retries", "p50 ms", "p99 ms", "cost USD"]
    print(table(headers, rows, right=range(1, 8)))

    reasons = sorted({r for c in dead.values() for r in c})
    if reasons:
        print()
        print("Dead letters by reason")
        rrows = [[r, *(str(dead[pid][r]) for pid in partners), str(sum(dead[pid][r] for pid in partners))]
                 for r in reasons]  # fmt: skip
        print(table(["reason", *partners, "total"], rrows, right=range(1, len(partners) + 2)))

    ok = not missing and not duplicated and not got.unmatched
    print()
    if missing:
        print(f"  no outcome for {len(missing)} requests, e.g. {', '.join(missing[:5])}")
    if duplicated:
        print(f"  more than one outcome for {len(duplicated)} requests, e.g. {', '.join(duplicated[:5])}")
    if got.unmatched:
        print(f"  {len(got.unmatched)} outcomes match no request the demo sent")
    if unknown:
        print(
            f"  {len(unknown)} dead-lettered outcome_unknown, as they must be: the simulator did their work,"
            " then dropped the connection, so the gateway cannot know the answer and does not pay for"
            " a second call (partner setting on_unknown)"
        )
    if unexpected:
        print(f"  {len(unexpected)} outcomes differ from what the demo expected, e.g.:")
        for line in unexpected[:5]:
            print(f"    {line}")
    print(f"every request got exactly one outcome: {'yes' if ok else 'no'}")
    return ok


def dropped_after_work(sim_url: str) -> set[str]:
    """Request ids whose call the simulator did and then dropped the connection of (`billed`
    above `ok` in `GET /_sim/calls`, keyed `<partner>:<request id>`)."""
    try:
        with urllib.request.urlopen(f"{sim_url}/_sim/calls?min_billed=1", timeout=5) as resp:  # noqa: S310
            calls: dict[str, dict[str, int]] = orjson.loads(resp.read()).get("calls_by_request") or {}
    except (OSError, ValueError) as exc:
        print(f"(simulator calls unavailable: {exc})")
        return set()
    return {key.split(":", 1)[-1] for key, c in calls.items() if c.get("billed", 0) > c.get("ok", 0)}


def print_simulator_stats(sim_url: str) -> None:
    try:
        with urllib.request.urlopen(f"{sim_url}/_sim/stats", timeout=5) as resp:  # noqa: S310 - loopback
            stats = orjson.loads(resp.read())
    except (OSError, ValueError) as exc:
        print(f"(simulator stats unavailable: {exc})")
        return
    counts: dict[str, int] = stats.get("status_counts") or {}
    order = sorted(counts, key=lambda s: (not s.isdigit(), s))
    answered = ", ".join(f"{s} x{counts[s]}" for s in order)
    by_key = ", ".join(f"{k} {v}" for k, v in sorted((stats.get("calls_by_key") or {}).items()))
    print(f"Simulator: {stats.get('calls_total', 0)} calls ({answered}); calls by key: {by_key}")


def print_metrics(metrics_url: str) -> None:
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as resp:  # noqa: S310 - loopback
            text = resp.read().decode()
    except OSError as exc:
        print(f"(gateway metrics unavailable: {exc})")
        return
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_requests_total":
                totals[f"outcome={sample.labels.get('outcome')}"] += int(sample.value)
            elif sample.name == "gateway_retries_total":
                totals[f"retries({sample.labels.get('reason')})"] += int(sample.value)
            elif sample.name == "gateway_upstream_429_total":
                totals["upstream 429"] += int(sample.value)
    shown = ", ".join(f"{k} {v}" for k, v in sorted(totals.items())) or "(nothing recorded)"
    print(f"Gateway /metrics: {shown}")
