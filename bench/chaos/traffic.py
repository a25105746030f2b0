"""The partners of a chaos run and the requests they send: mixed sizes, models and max_tokens.

Every request carries `params.metadata.user_id = "<partner>:<request_id>"`, the same key as
the `x-gateway-request-id` header the gateway sets, so the simulator counts calls per request
whether or not the gateway sends that header. Requests are produced at a steady rate by an
idempotent producer (a broker restart must not duplicate a request: that would make a
duplicate outcome that is not the gateway's fault).

A share of the requests (`batch_share`) can wait: they carry `service_class: batch` (half of
them with a deadline two hours away) or `auto` with such a deadline, which routing sends to a
Message Batch too. Which requests those are is drawn apart from the rest, so every request
has the same partner, size, model and max_tokens whatever the share.
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


@dataclass(frozen=True)
class PartnerPlan:
    id: str
    share: float  # of the requests
    weight: float
    on_unknown: str  # "deadletter" or "retry"


PARTNERS = (
    PartnerPlan("alpha", share=0.40, weight=3, on_unknown="deadletter"),
    PartnerPlan("bravo", share=0.35, weight=2, on_unknown="deadletter"),
    PartnerPlan("charlie", share=0.25, weight=1, on_unknown="retry"),
)
MODELS = (("claude-haiku-4-5", 0.5), ("claude-sonnet-4-5", 0.35), ("claude-opus-4-1", 0.15))
MAX_TOKENS = (16, 64, 256, 1024)
PROMPT_CHARS = ((40, 0.4), (400, 0.3), (4_000, 0.2), (40_000, 0.1))
BATCH_DEADLINE_S = 7_200.0
"""`respond_by` of batch-path requests that carry one: far beyond any turnaround the run sees."""
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


def build_requests(n: int, seed: int, tag: str, batch_share: float = 0.0) -> list[Request]:
    """`n` valid requests spread over `PARTNERS` by share; ids `<partner>-<tag>-<i>`;
    `batch_share` of them for the batch path (see the module docstring)."""
    rng = random.Random(seed)
    urgent = random.Random(f"{seed}-urgency")  # apart: the requests are the same whatever the share
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
        doc = {
            "request_id": request_id,
            **_urgency(urgency, respond_by),
            "metadata": {"chaos": tag},
            "params": {
                "model": _pick(rng, MODELS),
                "max_tokens": rng.choice(MAX_TOKENS),
                "messages": [{"role": "user", "content": f"Request {i}. {words}"}],
                "metadata": {"user_id": f"{partner}:{request_id}"},
            },
        }
        out.append(Request(partner, request_id, orjson.dumps(doc), urgency))
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
        max_request_size=2 * 1024 * 1024,
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
                    sent = await producer.send(topic_of(req.partner), req.value, key=req.request_id.encode())
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
