"""The partners of a chaos run and the requests they send, as partners really send them:
mixed prompt sizes, models, max_tokens, content types, Kafka headers and header bytes.

Every request carries `params.metadata.user_id = "<partner>:<request_id>"`, the same key as
the `x-gateway-request-id` header the gateway sets, so the simulator counts calls per request
whether or not the gateway sends that header. Requests are produced at a steady rate by an
idempotent producer (a broker restart must not duplicate a request: that would make a
duplicate outcome that is not the gateway's fault).

A share of the requests (`batch_share`) can wait: they carry `service_class: batch` (half of
them with a deadline two hours away) or `auto` with such a deadline, which routing sends to a
Message Batch too. Which requests those are is drawn apart from the rest, so every request
has the same partner, size, model and max_tokens whatever the share.

Content and headers are drawn apart too (each from its own generator of the seed), so they
change nothing else of a request either:

- content (`CONTENT`): 70% the text prompt alone; 10% one or two base64 PNG, JPEG or WebP
  images (at most 800x600) before it; 10% a base64 PDF of 1 to 5 pages before it; 10% the
  prompt with one to eight client `tools` definitions. The blocks are `bench.estimation`'s,
  size-capped: a record stays under 0.5 MB, headers included.
- W3C trace context: 60% carry a valid `traceparent` (random trace and span ids, flags `01`
  or `00`), a third of those a valid `tracestate` too (1 to 5 members), somewhere among the
  other headers. The verifier checks that each of their outcomes carries the same trace id.
- application headers (`APP_HEADERS`, one kind a request): none (25%); one to three small
  ASCII ones (25%); one of random binary bytes (20%: 0 B, 16 B, 1 KiB or 16 KiB); one whose
  value is null (8%); one whose value is not UTF-8 (8%); a name repeated two to four times
  (9%); 80 small ones (5%). Header names are always valid UTF-8 (a name that is not is
  dead-lettered `undecodable_record` by design) and never one the gateway reads
  (`x-gateway-*`, `gateway-batch`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from bench.estimation import image_block, pdf_block, tool_definitions


@dataclass(frozen=True)
class PartnerPlan:
    id: str
    share: float  # of the requests
    weight: float
    on_unknown: str  # "deadletter" or "retry"
    budget_usd_per_day: float | None = None
    """Never reached: the budget counters in Redis are kept through the chaos (and a Redis wipe)."""


PARTNERS = (
    PartnerPlan("alpha", share=0.40, weight=3, on_unknown="deadletter"),
    PartnerPlan("bravo", share=0.35, weight=2, on_unknown="deadletter", budget_usd_per_day=1_000_000.0),
    PartnerPlan("charlie", share=0.25, weight=1, on_unknown="retry"),
)
MODELS = (("claude-haiku-4-5", 0.5), ("claude-sonnet-4-5", 0.35), ("claude-opus-4-1", 0.15))
MAX_TOKENS = (16, 64, 256, 1024)
PROMPT_CHARS = ((40, 0.4), (400, 0.3), (4_000, 0.2), (40_000, 0.1))
MAX_REQUEST_SIZE = 2 * 1024 * 1024
"""The producer's: four times the largest record the mix makes (under 0.5 MB)."""
BATCH_DEADLINE_S = 7_200.0
"""`respond_by` of batch-path requests that carry one: far beyond any turnaround the run sees."""
CONTENT = (("text", 0.70), ("image", 0.10), ("pdf", 0.10), ("tools", 0.10))
MAX_IMAGE_SIZE = (800, 600)
MAX_IMAGES = 2
MAX_PDF_PAGES = 5
TRACEPARENT_SHARE = 0.6
TRACESTATE_SHARE = 1 / 3
"""Of the requests with a `traceparent`."""
APP_HEADERS = (
    ("none", 0.25),
    ("ascii", 0.25),
    ("binary", 0.20),
    ("null_value", 0.08),
    ("non_utf8", 0.08),
    ("repeated", 0.09),
    ("many", 0.05),
)
BINARY_SIZES = (0, 16, 1024, 16 * 1024)
MANY_HEADERS = 80
NON_UTF8 = (b"caf\xe9 cr\xe8me", b"\xff\xfe\x00\x01", b"\xc3\x28", b"\xe2\x28\xa1", b"\x80abc")
"""Header values that are not UTF-8: latin-1 text, a BOM-like prefix, broken sequences."""
Header = tuple[str, bytes | None]
T = TypeVar("T")
_WORDS = [
    "the",
    "gateway",
    "shares",
    "one",
    "organisation's",
    "limits",
    "fairly",
    "among",
    "many",
    "partners",
]


@dataclass(frozen=True)
class Request:
    partner: str
    request_id: str
    value: bytes
    urgency: str = "realtime"
    """What the request asked for: `realtime` (no field), `batch`, `batch+deadline` or
    `auto+deadline` (the last three go to a Message Batch)."""
    headers: tuple[Header, ...] = ()
    """Its Kafka record headers, in order (a value may be None)."""
    content: str = "text"
    """What its message holds besides the prompt: `text` (nothing), `image`, `pdf` or `tools`."""

    @property
    def batch(self) -> bool:
        return self.urgency != "realtime"

    @property
    def key(self) -> str:
        """The simulator's key for this request (as the gateway's header would name it)."""
        return f"{self.partner}:{self.request_id}"


def _pick(rng: random.Random, weighted: Sequence[tuple[T, float]]) -> T:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def _urgency(urgency: str, respond_by: str) -> dict[str, Any]:
    if urgency == "batch":
        return {"service_class": "batch"}
    if urgency == "batch+deadline":
        return {"service_class": "batch", "respond_by": respond_by}
    if urgency == "auto+deadline":
        return {"service_class": "auto", "respond_by": respond_by}
    return {}


def content(rng: random.Random, prompt: str) -> tuple[str, Any, dict[str, Any]]:
    """A content kind of `CONTENT`, the message's content, and params to add (`tools`)."""
    kind = _pick(rng, CONTENT)
    text = {"type": "text", "text": prompt}
    if kind == "image":
        images = [image_block(rng, MAX_IMAGE_SIZE) for _ in range(rng.randint(1, MAX_IMAGES))]
        return kind, [*images, text], {}
    if kind == "pdf":
        return kind, [pdf_block(rng, MAX_PDF_PAGES), text], {}
    if kind == "tools":
        return kind, prompt, {"tools": tool_definitions(rng)}
    return kind, prompt, {}


def trace_headers(rng: random.Random) -> list[Header]:
    """A valid W3C `traceparent` (version 00, random non-zero ids, flags 01 or 00), with a
    valid `tracestate` of 1 to 5 members `TRACESTATE_SHARE` of the time."""
    trace_id = rng.getrandbits(128) or 1
    span_id = rng.getrandbits(64) or 1
    flags = rng.choice(("01", "00"))
    out: list[Header] = [("traceparent", f"00-{trace_id:032x}-{span_id:016x}-{flags}".encode())]
    if rng.random() < TRACESTATE_SHARE:
        members = [
            f"{rng.choice(('vendor', 'rojo', 'congo'))}{j}={rng.getrandbits(64):016x}"
            if rng.random() < 0.5
            else f"t{j}@chaos={rng.getrandbits(32):08x}"
            for j in range(rng.randint(1, 5))
        ]
        out.append(("tracestate", ",".join(members).encode()))
    return out


def app_headers(rng: random.Random) -> tuple[str, list[Header]]:
    """One kind of `APP_HEADERS` and its headers."""
    kind = _pick(rng, APP_HEADERS)
    if kind == "ascii":
        pool: list[Header] = [
            ("content-type", b"application/json"),
            ("x-app-client", f"chaos-client/1.{rng.randint(0, 9)}.{rng.randint(0, 99)}".encode()),
            ("x-app-tenant", f"tenant-{rng.randint(1, 500)}".encode()),
            ("x-app-correlation-id", f"{rng.getrandbits(128):032x}".encode()),
        ]
        return kind, rng.sample(pool, rng.randint(1, 3))
    if kind == "binary":
        return kind, [("x-app-blob", rng.randbytes(rng.choice(BINARY_SIZES)))]
    if kind == "null_value":
        return kind, [("x-app-nothing", None)]
    if kind == "non_utf8":
        return kind, [("x-app-legacy", rng.choice(NON_UTF8))]
    if kind == "repeated":
        return kind, [("x-app-tag", f"tag-{j}".encode()) for j in range(rng.randint(2, 4))]
    if kind == "many":
        return kind, [(f"x-app-h{j:02d}", f"v{j}".encode()) for j in range(MANY_HEADERS)]
    return kind, []


def headers(rng: random.Random) -> tuple[Header, ...]:
    """A request's headers: maybe a trace context, and application headers of one kind, the
    trace context at a random place among them."""
    trace = trace_headers(rng) if rng.random() < TRACEPARENT_SHARE else []
    _, app = app_headers(rng)
    at = rng.randint(0, len(app))
    return (*app[:at], *trace, *app[at:])


def build_requests(n: int, seed: int, tag: str, batch_share: float = 0.0) -> list[Request]:
    """`n` valid requests spread over `PARTNERS` by share; ids `<partner>-<tag>-<i>`;
    `batch_share` of them for the batch path; content types and headers mixed (see the
    module docstring)."""
    rng = random.Random(seed)
    urgent = random.Random(f"{seed}-urgency")  # apart: the requests are the same whatever the share
    contents = random.Random(f"{seed}-content")  # apart too: the draws above stay the seed's
    heads = random.Random(f"{seed}-headers")
    deadline = datetime.fromtimestamp(time.time() + BATCH_DEADLINE_S, tz=UTC)
    respond_by = deadline.isoformat(timespec="seconds").replace("+00:00", "Z")
    partners = [p.id for p in PARTNERS]
    shares = [p.share for p in PARTNERS]
    out = []
    for i in range(n):
        partner = rng.choices(partners, shares)[0]
        request_id = f"{partner}-{tag}-{i:06d}"
        size = _pick(rng, PROMPT_CHARS)
        words = " ".join(rng.choice(_WORDS) for _ in range(max(1, size // 6)))
        urgency = "realtime"
        if urgent.random() < batch_share:
            urgency = urgent.choice(("batch", "batch+deadline", "auto+deadline", "auto+deadline"))
        model = _pick(rng, MODELS)
        max_tokens = rng.choice(MAX_TOKENS)
        kind, blocks, extra = content(contents, f"Request {i}. {words}")
        doc = {
            "request_id": request_id,
            **_urgency(urgency, respond_by),
            "metadata": {"chaos": tag},
            "params": {
                "model": model,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": blocks}],
                **extra,
                "metadata": {"user_id": f"{partner}:{request_id}"},
            },
        }
        out.append(Request(partner, request_id, orjson.dumps(doc), urgency, headers(heads), kind))
    return out


@dataclass
class Production:
    """What the producer managed: acknowledged requests, and ones whose fate is unknown."""

    acked: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)
    finished_at: float | None = None


async def produce_paced(
    bootstrap: str,
    topic_of: Callable[[str], str],
    requests: list[Request],
    rate_per_s: float | None,
    progress: Callable[[str], None],
) -> Production:
    """Send `requests` at `rate_per_s` (None: as fast as the broker takes them), in order;
    every send awaited (acked or failed)."""
    result = Production()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        request_timeout_ms=120_000,
        max_request_size=MAX_REQUEST_SIZE,
    )
    await producer.start()
    pending: set[asyncio.Task[None]] = set()

    async def deliver(req: Request, sent: asyncio.Future[object]) -> None:
        try:
            await sent
            result.acked.append(req)
        except KafkaError as exc:
            progress(f"request {req.request_id} not acknowledged: {type(exc).__name__}: {exc}")
            result.failed.append(req)

    try:
        began = time.monotonic()
        tick = 0.05
        step = max(1, round(rate_per_s * tick)) if rate_per_s else 500
        for i in range(0, len(requests), step):
            delay = began + i / rate_per_s - time.monotonic() if rate_per_s else 0.0
            if delay > 0:
                await asyncio.sleep(delay)
            for req in requests[i : i + step]:
                try:
                    sent = await producer.send(
                        topic_of(req.partner),
                        req.value,
                        key=req.request_id.encode(),
                        headers=list(req.headers),
                    )
                except KafkaError as exc:
                    progress(f"request {req.request_id} not sent: {type(exc).__name__}: {exc}")
                    result.failed.append(req)
                    continue
                task = asyncio.create_task(deliver(req, sent))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if rate_per_s and (i // step) % max(1, round(10 / tick)) == 0 and i:
                progress(f"produced {i} of {len(requests)}")
        if pending:
            await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    result.finished_at = time.monotonic()
    progress(f"produced {len(result.acked)} acknowledged, {len(result.failed)} failed")
    return result
