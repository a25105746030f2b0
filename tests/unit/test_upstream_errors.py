"""Every anthropic SDK exception class has a tested classification (retry or dead letter).

Errors are produced by the real SDK against a faked HTTP layer
(`httpx2.MockTransport`), so the mapping is tested on what the SDK raises.
ANTHROPIC.md: 400/401/403/404/413 are not retried; 429 (after retry-after),
500 and 529 are; a 429 whose error says a spend limit was reached is not.
"""

from __future__ import annotations

import inspect
import re
import socket
import typing
from collections.abc import Callable, Iterator

import anthropic
import h11
import httpx2
import orjson
import pytest

from service.admission.admit import Admission
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.contracts.params import HEADER_FIELDS
from service.contracts.reasons import Reason
from service.pipeline import Pipeline
from service.scheduling.scheduler import Scheduler
from service.telemetry.metrics import Metrics
from service.upstream.client import ClaudeClient
from service.upstream.errors import UNWRITABLE, Failure, classify, describe, may_have_been_sent
from tests.support.sink import MemorySink

PARAMS = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def _client(handler: Callable[[httpx2.Request], httpx2.Response]) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="sk-test",
        base_url="http://claude.test",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )


def _error(status: int, etype: str, headers: dict[str, str] | None = None, code: str | None = None):
    def handler(_: httpx2.Request) -> httpx2.Response:
        err: dict[str, object] = {"type": etype, "message": f"simulated {status}"}
        if code:
            err["details"] = {"error_code": code}
        return httpx2.Response(
            status,
            content=orjson.dumps({"type": "error", "error": err}),
            headers={"content-type": "application/json", "request-id": "req_1", **(headers or {})},
        )

    return handler


async def _raised(handler: Callable[[httpx2.Request], httpx2.Response]) -> BaseException:
    client = _client(handler)
    with pytest.raises(anthropic.AnthropicError) as info:
        await client.messages.create(**PARAMS)  # type: ignore[arg-type]
    return info.value


STATUS_CASES = [
    (400, "invalid_request_error", anthropic.BadRequestError, False, Reason.INVALID_REQUEST),
    (401, "authentication_error", anthropic.AuthenticationError, False, Reason.UPSTREAM_AUTHENTICATION),
    (402, "billing_error", anthropic.PaymentRequiredError, False, Reason.UPSTREAM_SPEND_LIMIT),
    (403, "permission_error", anthropic.PermissionDeniedError, False, Reason.UPSTREAM_PERMISSION),
    (404, "not_found_error", anthropic.NotFoundError, False, Reason.UPSTREAM_NOT_FOUND),
    (408, "timeout_error", anthropic.RequestTimeoutError, True, Reason.RETRIES_EXHAUSTED),
    (409, "conflict_error", anthropic.ConflictError, True, Reason.RETRIES_EXHAUSTED),
    (412, "invalid_request_error", anthropic.PreconditionFailedError, False, Reason.UPSTREAM_REJECTED),
    (413, "request_too_large", anthropic.ContentTooLargeError, False, Reason.UPSTREAM_TOO_LARGE),
    (422, "invalid_request_error", anthropic.UnprocessableEntityError, False, Reason.INVALID_REQUEST),
    (429, "rate_limit_error", anthropic.RateLimitError, True, Reason.RETRIES_EXHAUSTED),
    (
        431,
        "invalid_request_error",
        anthropic.RequestHeaderFieldsTooLargeError,
        False,
        Reason.UPSTREAM_REJECTED,
    ),
    (499, "invalid_request_error", anthropic.ClientClosedRequestError, False, Reason.UPSTREAM_REJECTED),
    (500, "api_error", anthropic.InternalServerError, True, Reason.RETRIES_EXHAUSTED),
    (501, "api_error", anthropic.HTTPNotImplementedError, True, Reason.RETRIES_EXHAUSTED),
    (503, "api_error", anthropic.ServiceUnavailableError, True, Reason.RETRIES_EXHAUSTED),
    (504, "timeout_error", anthropic.GatewayTimeoutError, True, Reason.RETRIES_EXHAUSTED),
    (529, "overloaded_error", anthropic.OverloadedError, True, Reason.RETRIES_EXHAUSTED),
]


@pytest.mark.parametrize(("status", "etype", "cls", "retryable", "reason"), STATUS_CASES)
async def test_status_errors_from_the_sdk(status, etype, cls, retryable, reason) -> None:
    exc = await _raised(_error(status, etype, {"retry-after": "7"} if status == 429 else None))
    assert type(exc) is cls
    f = classify(exc)
    assert (f.retryable, f.reason, f.status) == (retryable, reason, status)
    assert f.request_id == "req_1"
    if status == 429:
        assert f.retry_after_s == 7.0
        assert f.rate_limited


@pytest.mark.parametrize(
    "code",
    [
        "enforced_spend_limit_reached",
        "contract_spend_limit_reached",
        "linked_organization_spend_limit_reached",
    ],
)
async def test_spend_limit_429_is_not_retried(code: str) -> None:
    exc = await _raised(_error(429, "rate_limit_error", {"retry-after": "1"}, code=code))
    assert isinstance(exc, anthropic.RateLimitError)
    f = classify(exc)
    assert not f.retryable
    assert f.reason is Reason.UPSTREAM_SPEND_LIMIT
    assert not f.rate_limited


async def test_connection_errors_and_timeouts_are_retried() -> None:
    def drop(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection reset", request=request)

    def slow(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("timed out", request=request)

    conn = await _raised(drop)
    assert type(conn) is anthropic.APIConnectionError
    assert classify(conn) == Failure(True, Reason.RETRIES_EXHAUSTED, "connection")
    timeout = await _raised(slow)
    assert type(timeout) is anthropic.APITimeoutError
    assert classify(timeout).label == "timeout"
    assert classify(timeout).retryable


async def test_garbled_success_is_a_retryable_validation_error() -> None:
    def garbled(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=b"<html>proxy</html>", headers={"content-type": "text/html"})

    client = anthropic.AsyncAnthropic(
        api_key="sk-test",
        base_url="http://claude.test",
        max_retries=0,
        _strict_response_validation=True,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(garbled)),
    )
    with pytest.raises(anthropic.APIResponseValidationError) as info:
        await client.messages.create(**PARAMS)  # type: ignore[arg-type]
    assert classify(info.value).retryable


def test_every_sdk_exception_class_is_classified() -> None:
    """Walk every exception class the SDK exports; each must map without raising."""
    request = httpx2.Request("POST", "http://claude.test/v1/messages")
    classes = {
        obj
        for _, obj in inspect.getmembers(anthropic, inspect.isclass)
        if issubclass(obj, anthropic.AnthropicError)
    }
    seen_codes: set[str] = set()
    assert len(classes) >= 30  # the SDK's tree, spend-limit subclasses included
    for cls in classes:
        exc: BaseException
        if issubclass(cls, anthropic.APIStatusError):
            status = getattr(cls, "status_code", 500)
            status = status if isinstance(status, int) else 500
            exc = cls("x", response=httpx2.Response(status, request=request), body=None)
        elif issubclass(cls, anthropic.APIResponseValidationError):
            exc = cls(httpx2.Response(200, request=request), None)
        elif issubclass(cls, anthropic.APITimeoutError):
            exc = cls(request)
        elif issubclass(cls, anthropic.APIConnectionError):
            exc = cls(request=request)
        elif issubclass(cls, anthropic.APIError):
            exc = cls("x", request, body=None)
        else:
            exc = cls("x")
        f = classify(exc)
        assert isinstance(f, Failure), cls
        code = _literal_error_code(cls)
        if code is not None:
            seen_codes.add(code)
        if code is not None and "spend_limit" in code:
            body = {"type": "error", "error": {"type": "rate_limit_error", "details": {"error_code": code}}}
            coded = cls("x", response=httpx2.Response(429, request=request), body=body)
            assert not classify(coded).retryable, cls
            assert classify(coded).reason is Reason.UPSTREAM_SPEND_LIMIT
    assert {"enforced_spend_limit_reached", "ramp_limit_exceeded"} <= seen_codes
    assert not classify(anthropic.CredentialsError("no key")).retryable
    assert classify(anthropic.RetryableError("again")).retryable


def _literal_error_code(cls: type) -> str | None:
    hint = vars(cls).get("__annotations__", {}).get("error_code")
    if hint is None:
        return None
    args = typing.get_args(hint)
    if args:
        return args[0] if isinstance(args[0], str) else None
    match = re.search(r"Literal\[['\"]([a-z_]+)['\"]\]", str(hint))
    return match.group(1) if match else None


def test_foreign_exceptions_are_refused() -> None:
    with pytest.raises(TypeError):
        classify(ValueError("not ours"))


# -- a request the HTTP client cannot write: nothing was sent, and it never will be -------------------

KEY = "sk-ant-secret-key-0123"


@pytest.fixture
def listening() -> Iterator[str]:
    """A base URL whose port accepts connections (into the kernel's backlog) and never answers:
    h11 refuses a bad header before writing a byte, so nothing has to answer."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def _causes(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None and len(out) < 10:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("workspace_id", "a\nb"),
        ("workspace_id", "a\rb"),
        ("user_profile_id", "a\x00b"),
        ("workspace_id", " "),
    ],
)
async def test_a_header_http_cannot_carry_is_an_invalid_request_not_a_connection_failure(
    listening: str, field: str, value: str
) -> None:
    """The real HTTP stack (h11 under httpcore2 under httpx2) refuses to write the request; the SDK
    says APIConnectionError. It used to be retried as a connection failure, six times, then
    dead-lettered `retries_exhausted` (retryable) with "connection: APIConnectionError"."""
    client = anthropic.AsyncAnthropic(api_key=KEY, base_url=listening, max_retries=0)
    try:
        with pytest.raises(anthropic.APIConnectionError) as info:
            await client.messages.create(**PARAMS, **{field: value})  # type: ignore[arg-type]
    finally:
        await client.close()
    exc = info.value
    assert type(exc) is anthropic.APIConnectionError
    assert [type(c) for c in _causes(exc)[1:2]] == [httpx2.LocalProtocolError]  # what the SDK wraps
    assert any(isinstance(c, h11.LocalProtocolError) for c in _causes(exc))
    failure = classify(exc)
    assert failure == Failure(False, Reason.INVALID_REQUEST, UNWRITABLE)
    assert not may_have_been_sent(exc)
    detail = describe(failure, exc)
    assert detail == (
        "the request could not be sent: the HTTP client refused to write it (LocalProtocolError): "
        f"the value of header {HEADER_FIELDS[field]} (params.{field}) is not a valid HTTP header value; "
        "nothing reached Claude"
    )
    assert KEY not in detail
    assert repr(value.encode()) not in detail  # h11's own message quotes the value: never copied


async def test_an_api_key_http_cannot_carry_is_named_and_never_quoted(listening: str) -> None:
    key = KEY + "\n"
    client = anthropic.AsyncAnthropic(api_key=key, base_url=listening, max_retries=0)
    try:
        with pytest.raises(anthropic.APIConnectionError) as info:
            await client.messages.create(**PARAMS)  # type: ignore[arg-type]
    finally:
        await client.close()
    assert KEY in str(info.value.__cause__)  # h11 quotes it
    failure = classify(info.value)
    assert (failure.retryable, failure.reason) == (False, Reason.INVALID_REQUEST)
    detail = describe(failure, info.value)
    assert re.search(
        r": the value of header (authorization|x-api-key) is not a valid HTTP header value;", detail
    )
    assert KEY not in detail
    assert "sk-" not in detail


async def test_a_request_the_transport_refuses_to_write_is_not_retried() -> None:
    """Whatever the transport: an httpx2 LocalProtocolError is the client's refusal, not the
    network's (a RemoteProtocolError, the server's fault, is still retried)."""

    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.LocalProtocolError(f"Illegal header value {KEY!r}", request=request)

    def garble(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.RemoteProtocolError("peer closed connection", request=request)

    refused = await _raised(refuse)
    assert type(refused) is anthropic.APIConnectionError
    failure = classify(refused)
    assert failure == Failure(False, Reason.INVALID_REQUEST, UNWRITABLE)
    assert not may_have_been_sent(refused)
    detail = describe(failure, refused)
    assert detail == (
        "the request could not be sent: the HTTP client refused to write it (LocalProtocolError); "
        "nothing reached Claude"
    )
    garbled = await _raised(garble)
    assert classify(garbled) == Failure(True, Reason.RETRIES_EXHAUSTED, "connection")
    assert may_have_been_sent(garbled)


async def test_through_the_pipeline_one_attempt_and_an_invalid_request_dead_letter() -> None:
    settings = parse_config(
        {
            "retry": {"max_attempts": 6, "base_delay_s": 0.001, "max_delay_s": 0.001},
            "partners": [{"id": "acme", "api_key": {"env": "K"}}],
        }
    )
    registry = Registry.build(settings, environ={"K": KEY})
    calls: list[httpx2.Request] = []

    def refuse(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        raise httpx2.LocalProtocolError(f"Illegal header value {KEY!r}", request=request)

    claude = ClaudeClient(
        settings.anthropic, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(refuse))
    )
    claude.sync_keys(registry.api_keys())
    pipeline = Pipeline(settings, Admission(registry), Scheduler(settings), claude, Metrics())

    class Record:
        topic, partition, offset, timestamp, key = "claude.requests.acme", 0, 7, 1_700_000_000_000, b"r1"
        headers: list[tuple[str, bytes]] = []
        value = orjson.dumps({"request_id": "r1", "params": PARAMS})

    sink = MemorySink(7)
    await pipeline.handle(Record(), sink)
    assert len(calls) == 1
    (dead,) = [orjson.loads(m.value) for m in sink.published if "deadletter" in m.topic]
    assert (dead["reason"], dead["retryable"], dead["attempts"]) == ("invalid_request", False, 1)
    assert dead["detail"].startswith("the request could not be sent: the HTTP client refused to write it")
    assert KEY not in orjson.dumps(dead).decode()
