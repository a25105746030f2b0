"""Realistic partner traffic for the benches: mixed prompt sizes, several models, varied max_tokens.

Every request is a valid request.v1 document. The mix is drawn from a seeded generator, so two
runs given the same seed produce the same requests (the contenders of a bench see the same work):

- prompt size: log-uniform between `PROMPT_MIN_BYTES` (tens of bytes) and `PROMPT_MAX_BYTES`
  (tens of KB): as many requests between 40 B and 400 B as between 4 KB and 40 KB, median
  about 1.3 KB, mean about 5.8 KB;
- model: haiku 50%, sonnet 35%, opus 15% (the three models the gateway has prices for);
- max_tokens: 64, 256, 1024 or 4096;
- a system prompt on a third of them, and a two-turn conversation on a fifth.

The simulator (not this module) decides how many output tokens each answer has, capped by
max_tokens: see `SIM_OUTPUT_ARGS`.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

PROMPT_MIN_BYTES = 40
PROMPT_MAX_BYTES = 40_000
MODELS: tuple[tuple[str, float], ...] = (
    ("claude-haiku-4-5", 0.50),
    ("claude-sonnet-4-5", 0.35),
    ("claude-opus-4-1", 0.15),
)
MAX_TOKENS: tuple[tuple[int, float], ...] = ((64, 0.3), (256, 0.35), (1024, 0.25), (4096, 0.1))
SIM_OUTPUT_ARGS = [
    "--output-distribution", "lognormal", "--output-median-tokens", "120", "--output-sigma", "1.0",
]  # fmt: skip
"""Simulator flags for the answers' lengths: median 120 tokens, a long tail (capped by max_tokens)."""

_VOCABULARY = (
    "the gateway partner request answer kafka partition offset commit model token budget limit "
    "summarise explain contract invoice customer ticket order refund shipment delay weather report "
    "quarterly revenue growth churn forecast incident outage latency throughput replica broker "
    "consumer producer transaction fence epoch claim tick window ledger metadata"
)
_WORDS = tuple(_VOCABULARY.split())


def _corpus(seed: int, size: int) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    length = 0
    while length < size:
        w = rng.choice(_WORDS)
        out.append(w)
        length += len(w) + 1
    return " ".join(out)


_CORPUS = _corpus(7, 2 * PROMPT_MAX_BYTES)


@dataclass(frozen=True, slots=True)
class Mix:
    """What one request looks like (for the bench's report)."""

    model: str
    max_tokens: int
    prompt_bytes: int


def _pick(rng: random.Random, table: Sequence[tuple[Any, float]]) -> Any:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def _text(rng: random.Random, size: int) -> str:
    start = rng.randrange(0, len(_CORPUS) - size)
    return _CORPUS[start : start + size]


def draw(rng: random.Random) -> tuple[Mix, dict[str, Any]]:
    """One request's `params` (and its shape)."""
    size = int(math.exp(rng.uniform(math.log(PROMPT_MIN_BYTES), math.log(PROMPT_MAX_BYTES))))
    mix = Mix(_pick(rng, MODELS), _pick(rng, MAX_TOKENS), size)
    params: dict[str, Any] = {"model": mix.model, "max_tokens": mix.max_tokens}
    if rng.random() < 1 / 3:
        params["system"] = "You are a careful assistant for an operations team. Answer briefly."
    if rng.random() < 0.2:
        head = max(20, size // 3)
        params["messages"] = [
            {"role": "user", "content": _text(rng, head)},
            {"role": "assistant", "content": "Noted. What should I do with it?"},
            {"role": "user", "content": _text(rng, max(20, size - head))},
        ]
    else:
        params["messages"] = [{"role": "user", "content": _text(rng, size)}]
    return mix, params


def request_value(request_id: str, params: dict[str, Any]) -> bytes:
    return orjson.dumps({"request_id": request_id, "params": params})


class Traffic:
    """A seeded stream of requests: `next(prefix)` -> (request id, value, shape)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._i = 0

    def next(self, prefix: str) -> tuple[str, bytes, Mix]:
        rid = f"{prefix}-{self._i}"
        self._i += 1
        mix, params = draw(self._rng)
        return rid, request_value(rid, params), mix


def summarise(mixes: Sequence[Mix]) -> dict[str, Any]:
    """The traffic's shape, for the JSON line."""
    sizes = sorted(m.prompt_bytes for m in mixes)
    if not sizes:
        return {}
    models: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for m in mixes:
        models[m.model] = models.get(m.model, 0) + 1
        tokens[str(m.max_tokens)] = tokens.get(str(m.max_tokens), 0) + 1
    return {
        "requests": len(sizes),
        "prompt_bytes": {
            "min": sizes[0],
            "p50": sizes[len(sizes) // 2],
            "p99": sizes[min(len(sizes) - 1, int(0.99 * len(sizes)))],
            "max": sizes[-1],
            "mean": round(sum(sizes) / len(sizes)),
        },
        "models": models,
        "max_tokens": tokens,
    }


async def produce(
    bootstrap: str,
    topic: str,
    n: int,
    prefix: str,
    seed: int,
    partitions: int | None = None,
) -> list[Mix]:
    """Produce `n` requests of the mix to `topic`, all acknowledged (key = request id). With
    `partitions`, request i goes to partition i % partitions (every partition gets its share)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        max_request_size=2 * 1024 * 1024,
    )
    traffic = Traffic(seed)
    mixes: list[Mix] = []
    await producer.start()
    try:
        futures = []
        for i in range(n):
            rid, value, mix = traffic.next(prefix)
            mixes.append(mix)
            part = None if partitions is None else i % partitions
            futures.append(await producer.send(topic, value, key=rid.encode(), partition=part))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return mixes
