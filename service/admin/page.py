"""The console's HTML: rendered on the server from the state document, no script at all.

Every value is escaped. Each partner is a `<section id="partner-<id>">` whose
cells carry `data-field` names, so a browser test can read the page and
compare it with the JSON API. Actions are plain forms (POST, with a CSRF
token), answered by a redirect back to the page.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.2em 0 .3em}
h3{font-size:1em;margin:.8em 0 .2em}
table{border-collapse:collapse;margin:.3em 0 .8em;background:#fff}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}
section.partner{border:1px solid #bbb;border-radius:6px;padding:.2em 1em .6em;margin:1em 0;background:#fff}
.badge{display:inline-block;padding:.05em .5em;border-radius:4px;font-weight:600}
.badge.running{background:#d7f5d7}.badge.paused{background:#ffe2a8}.badge.draining{background:#cfe3ff}
.badge.disabled,.badge.local{background:#ddd}.badge.degraded{background:#ffc9c9}.badge.shared{background:#d7f5d7}
form.inline{display:inline;margin-right:.4em}.muted{color:#666}.error{color:#b00;font-weight:600}
"""


_BUDGET_COLUMNS = ["period", "tokens used", "token cap", "tokens left", "USD used", "USD cap", "USD left"]
_EOS_COLUMNS = ["partition", "writer", "paused", "commit", "high watermark", "lag", "window", "claims"]


def _e(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return escape(f"{value:,.6f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}")
    if isinstance(value, int):
        return f"{value:,}"
    return escape(str(value))


def _table(headers: Iterable[str], rows: Iterable[Iterable[tuple[str, object]]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for name, value in row:
            num = " num" if isinstance(value, int | float) and not isinstance(value, bool) else ""
            cells.append(f'<td class="{escape(name)}{num}" data-field="{escape(name)}">{_e(value)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        return '<p class="muted">none</p>'
    return f'<table class="{escape(cls)}"><tr>{head}</tr>{"".join(body)}</table>'


def _actions(pid: str, state: str, csrf: str) -> str:
    wanted = {"running": ("pause", "drain"), "paused": ("resume", "drain"), "draining": ("resume", "pause")}
    out = []
    for action in wanted.get(state, ("pause", "resume")):
        out.append(
            f'<form class="inline" method="post" action="/admin/partners/{escape(pid)}/{action}">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            f'<button type="submit" name="action" value="{action}" id="{action}-{escape(pid)}">'
            f"{action}</button>"
            "</form>"
        )
    return "".join(out)


def _partner(p: Mapping[str, Any], csrf: str) -> str:
    pid = p["id"]
    hold = p["hold"]
    held = "" if hold is None else f' <span class="muted">by {_e(hold["by"])} at {_e(hold["at"])}</span>'
    limits = [
        [("bucket", dim), ("limit", p["limits"][dim]), ("max", eff["max"]), ("fair_share", eff["fair_share"])]
        for dim, eff in p["effective_limits"].items()
    ]
    budget = [
        [
            ("period", f"{b['period']} {b['label']}"),
            ("tokens_used", b["tokens_used"]),
            ("tokens_limit", b["tokens_limit"]),
            ("tokens_remaining", b["tokens_remaining"]),
            ("usd_used", b["usd_used"]),
            ("usd_limit", b["usd_limit"]),
            ("usd_remaining", b["usd_remaining"]),
        ]
        for b in p["budget"]
    ]
    spend = [
        [("period", period), ("model", model), ("usd", usd)]
        for period in ("today", "month")
        for model, usd in p["spend_usd"][period]["by_model"].items()
    ]
    dead = [[("reason", r), ("count", n)] for r, n in p["dead_letters_last_hour"].items()]
    eos = [
        [
            ("partition", f"{r['topic']}[{r['partition']}]"),
            ("writer", r["writer"]),
            ("paused", r["paused"]),
            ("commit", r["commit"] if r["commit"] is not None and r["commit"] >= 0 else None),
            ("high_watermark", r["high_watermark"]),
            ("lag", r["lag"]),
            ("window", r["window"]),
            ("claims", r["claims"]),
        ]
        for r in p["exactly_once"]
    ]
    summary = _table(
        [
            "enabled",
            "weight",
            "in flight",
            "queued (held too)",
            "held",
            "partitions",
            "paused partitions",
            "lag",
        ],
        [
            [
                ("enabled", p["enabled"]),
                ("weight", p["weight"]),
                ("in_flight", p["in_flight"]),
                ("queued", p["queued"]),
                ("held", p["held"]),
                ("partitions", p["partitions"]["owned"]),
                ("paused_partitions", p["partitions"]["paused"]),
                ("lag", p["lag"]),
            ]
        ],
        "summary",
    )
    return (
        f'<section class="partner" id="partner-{escape(pid)}" data-state="{escape(p["state"])}">'
        f'<h2>{escape(pid)} <span class="badge {escape(p["state"])}" data-field="state">{escape(p["state"])}'
        f"</span>{held}</h2>"
        f"<div>{_actions(pid, p['state'], csrf)}</div>{summary}"
        f"<h3>Limits per minute (own, most it can get, weighted share of the org when all are busy)</h3>"
        f"{_table(['bucket', 'own limit', 'max', 'fair share'], limits, 'limits')}"
        f"<h3>Budget{'' if p['budget_shared'] else ' (this replica; no redis)'}</h3>"
        f"{_table(_BUDGET_COLUMNS, budget, 'budget')}"
        "<h3>Spend (USD): today "
        f'<span data-field="spend_today">{_e(p["spend_usd"]["today"]["total"])}</span>, '
        f'this month <span data-field="spend_month">{_e(p["spend_usd"]["month"]["total"])}</span></h3>'
        f"{_table(['period', 'model', 'USD'], spend, 'spend')}"
        f"<h3>Dead letters, last hour</h3>{_table(['reason', 'count'], dead, 'dead-letters')}"
        f"<h3>Partitions (exactly-once state)</h3>"
        f"{_table(_EOS_COLUMNS, eos, 'eos')}"
        "</section>"
    )


def render(state: Mapping[str, Any], csrf: str, *, refresh_s: int | None = None, notice: str = "") -> str:
    lim = state["limiter"]
    buckets = [
        [
            ("scope", b["scope"]),
            ("bucket", b["bucket"]),
            ("available", b["available"]),
            ("capacity", b["capacity"]),
        ]
        for b in lim["buckets"]
    ]
    upstream = [
        [("bucket", k), ("remaining", v)] for k, v in sorted(state["upstream_ratelimit_remaining"].items())
    ]
    replicas = [
        [
            ("replica", r["id"] + (" (this one)" if r.get("this") else "")),
            ("host", r["host"]),
            ("version", r["version"]),
            ("ready", r.get("ready")),
            ("partitions", r.get("partitions")),
            ("seen_at", r["seen_at"]),
        ]
        for r in state["replicas"]
    ]
    meta = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else ""
    partners = "".join(_partner(p, csrf) for p in state["partners"])
    note = f'<p class="notice" id="notice">{escape(notice)}</p>' if notice else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Claude Partner Gateway: admin</title>{meta}<style>{_STYLE}</style></head><body>"
        f"<h1>Claude Partner Gateway</h1>"
        f'<p class="muted">version {_e(state["version"])}, '
        f'replica <span id="replica">{_e(state["replica"])}</span>, '
        f'state at <span id="generated-at">{_e(state["generated_at"])}</span> '
        '(<a href="/admin">refresh</a>, <a href="/admin/api/state">JSON</a>)</p>'
        f"{note}"
        f'<p>Limiter: <span id="limiter-state" class="badge {escape(lim["state"])}">'
        f"{escape(lim['state'])}</span> "
        f"(backend {escape(lim['backend'])}); pause and drain apply to "
        f'<span id="pause-scope">{escape(state["pause_scope"])}</span>.</p>'
        "<h2>Replicas</h2>"
        f"{_table(['replica', 'host', 'version', 'ready', 'partitions', 'seen'], replicas, 'replicas')}"
        f"<h2>Limiter buckets</h2>{_table(['scope', 'bucket', 'available', 'capacity'], buckets, 'buckets')}"
        "<h2>Upstream rate-limit headers last seen (remaining)</h2>"
        f"{_table(['bucket', 'remaining'], upstream, 'upstream')}"
        f"<h2>Partners</h2>{partners}"
        '<form method="post" action="/admin/logout"><button type="submit" id="logout">log out</button></form>'
        "</body></html>"
    )


def login(error: str = "") -> str:
    err = f'<p class="error" id="login-error">{escape(error)}</p>' if error else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Claude Partner Gateway: admin</title>"
        f"<style>{_STYLE}</style></head><body><h1>Claude Partner Gateway: admin</h1>{err}"
        '<form method="post" action="/admin/login"><label>Admin token '
        '<input type="password" name="token" id="token" autocomplete="off" required></label> '
        '<button type="submit" id="login">log in</button></form>'
        '<p class="muted">The token is the secret that <code>admin.token</code> refers to.</p></body></html>'
    )
