"""Batch-level validation (400 `invalid_request_error`, nothing created) and the batch config.

ANTHROPIC.md (Message Batches): up to 100,000 requests or 256 MB, `custom_id` unique and
`[A-Za-z0-9_-]{1,64}`, no `max_tokens: 0`; streaming makes no sense in a batch. An invalid
entry's params are not a batch failure: see the mixed batch in test_sim_batches.py.
"""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from service.simulator import SimulatorConfig, SimulatorConfigError, load_config
from service.simulator.__main__ import build_parser, overrides_from_args
from service.simulator.config import MAX_BATCH_BYTES, MAX_BATCH_REQUESTS, updated_config
from tests.simulator.batchkit import entry, params
from tests.simulator.conftest import ClientFactory, SimFactory


def with_params(custom_id: str, **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "params": params(**extra)}


CASES: dict[str, tuple[list[Any], dict[str, Any], str]] = {
    # name: (requests, batches config, what the message names)
    "no requests": ([], {}, "at least 1 request"),
    "over max_requests": ([entry(f"r{i}") for i in range(4)], {"max_requests": 3}, "at most 3 requests"),
    "over max_bytes": ([entry("big", text="x" * 5_000)], {"max_bytes": 2_000}, "maximum size of 2000 bytes"),
    "duplicate custom_id": ([entry("same"), entry("other"), entry("same")], {}, "requests.2.custom_id"),
    "custom_id too long": ([entry("x" * 65)], {}, "requests.0.custom_id: String should match"),
    "custom_id with a colon": ([entry("acme:r-1")], {}, "requests.0.custom_id: String should match"),
    "custom_id empty": ([entry("")], {}, "requests.0.custom_id: String should match"),
    "custom_id with a newline": ([entry("abc\n")], {}, "requests.0.custom_id: String should match"),
    "max_tokens 0": ([entry("ok"), entry("warm", max_tokens=0)], {}, "requests.1.params.max_tokens"),
    "stream true": ([with_params("s", stream=True)], {}, "requests.0.params.stream"),
    "params not an object": ([{"custom_id": "p", "params": "hello"}], {}, "requests.0.params"),
    "an extra entry field": ([{**entry("e"), "priority": 1}], {}, "requests.0.priority: Extra inputs"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_batch_level_errors_create_nothing(
    make_sim: SimFactory, make_client: ClientFactory, case: str
) -> None:
    requests, batches, fragment = CASES[case]
    sim = await make_sim(SimulatorConfig(batches=batches))
    client = make_client(sim)
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.batches.create(requests=requests)
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error"
    assert str(info.value.request_id).startswith("req_")
    assert fragment in str(info.value.api_message)
    assert (await client.messages.batches.list()).data == []
    assert sim.stats()["batches"]["created"] == 0


async def test_the_api_limit_of_100_000_requests(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim()
    client = make_client(sim)
    requests = [entry(f"r{i}", max_tokens=1, text="x") for i in range(MAX_BATCH_REQUESTS + 1)]
    with pytest.raises(anthropic.BadRequestError, match="at most 100000 requests, got 100001"):
        await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]


async def test_a_wrong_body_is_a_400(make_sim: SimFactory, make_client: ClientFactory) -> None:
    sim = await make_sim()
    client = make_client(sim)
    for body, fragment in (
        ({"requests": "all of them"}, "requests: Input should be a valid list"),
        ({"requests": [entry("a")], "priority": "high"}, "priority: Extra inputs"),
        ({}, "requests: Field required"),
    ):
        with pytest.raises(anthropic.BadRequestError, match=fragment):
            await client.post("/v1/messages/batches", body=body, cast_to=object)


def test_batch_defaults_follow_the_api() -> None:
    batches = SimulatorConfig().batches
    assert batches.max_requests == MAX_BATCH_REQUESTS == 100_000
    assert batches.max_bytes == MAX_BATCH_BYTES == 256 * 1024 * 1024
    assert batches.expiry_s == 24.0  # 24 h, one second an hour
    assert batches.retention_s == 29 * 24.0  # results are kept 29 days
    assert batches.processing_s == 1.0  # "most batches end within an hour"
    assert batches.processing_max_s is None
    assert batches.max_queued_requests is None
    assert batches.outcome_rate == 0


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"processing_s": 5.0, "processing_max_s": 1.0}, "processing_max_s"),
        ({"api_error_rate": 0.6, "expire_rate": 0.6}, "at most 1"),
        ({"max_queued_requests": 0}, "batches.max_queued_requests"),
        ({"expiry_s": 0}, "batches.expiry_s"),
        ({"retries": 3}, "batches.retries"),
    ],
)
def test_invalid_batch_settings_name_the_setting(change: dict[str, Any], where: str) -> None:
    with pytest.raises(SimulatorConfigError, match=where):
        updated_config(SimulatorConfig(), {"batches": change})


def test_cli_flags() -> None:
    args = build_parser().parse_args(
        ["--batch-processing-s", "2", "--batch-expiry-s", "48", "--batch-max-queued-requests", "10"]
    )
    batches = load_config(None, overrides_from_args(args)).batches
    assert (batches.processing_s, batches.expiry_s, batches.max_queued_requests) == (2.0, 48.0, 10)
    assert batches.processing_max_s is None
