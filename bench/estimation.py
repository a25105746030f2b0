"""How far admission's input-token estimate is from what the upstream bills.

The reservation before a call uses a conservative estimate (request bytes over
`runtime.estimate_chars_per_token`); settlement refunds the difference. This
measures estimate / billed over typical English prompts against the simulator's
token count (real Claude tokenization is not reachable from here).
"""

from __future__ import annotations

import random
from typing import Any

import orjson

from service.admission.admit import Admission, Admitted, Record
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.simulator import count_input_tokens

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
]


def _admission() -> Admission:
    settings = parse_config(
        {"partners": [{"id": "acme", "api_key": {"env": "K"}, "max_request_bytes": 4_000_000}]}
    )
    return Admission(Registry.build(settings, environ={"K": "sk-estimation"}))


def estimate_and_billed(admission: Admission, params: dict[str, Any]) -> tuple[int, int]:
    value = orjson.dumps({"request_id": "r", "params": params})
    verdict = admission.admit(Record("claude.requests.acme", 0, 0, None, b"r", value))
    if not isinstance(verdict, Admitted):
        raise ValueError(f"not admitted: {verdict}")
    return verdict.est_input_tokens, count_input_tokens(params)


def estimation_error(samples: int = 2000, seed: int = 7) -> dict[str, float]:
    """Quantiles of estimate / billed input tokens."""
    rng = random.Random(seed)
    admission = _admission()
    ratios = []
    for _ in range(samples):
        turns = [
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 400))) for _ in range(rng.randint(1, 6))
        ]
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)
        ]
        est, billed = estimate_and_billed(
            admission, {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": messages}
        )
        ratios.append(est / billed)
    ratios.sort()
    return {
        "min": round(ratios[0], 3),
        "p50": round(ratios[len(ratios) // 2], 3),
        "p99": round(ratios[int(len(ratios) * 0.99)], 3),
        "max": round(ratios[-1], 3),
    }


def run() -> dict[str, Any]:
    err = estimation_error()
    return {
        "bench": "estimation",
        "input_estimate_over_billed": err,
        "conservative": err["min"] >= 1.0,
        "samples": 2000,
    }
