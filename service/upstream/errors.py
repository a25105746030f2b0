"""Map every anthropic SDK exception to what the service does about it.

Classification is by exception class (and the stable `error_code`), never by
message text. Each class of the SDK has a tested mapping:

    AnthropicError
    ├── APIError
    │   ├── APIStatusError ── one subclass per HTTP status (400 ... 529)
    │   ├── APIConnectionError ── APITimeoutError        -> retry
    │   ├── APIResponseValidationError                   -> retry (a garbled answer)
    │   └── APIWebhookValidationError                    -> not a Messages outcome: dead letter
    ├── RetryableError                                   -> retry
    └── CredentialsError ── IdentityTokenFileError       -> dead letter (key unusable)

A 400 is the partner's request content (`invalid_request`, with Claude's message), as is
`InvalidParams`: the SDK refusing the arguments before it sends anything (a `TypeError` or
`ValueError` from `create()`, e.g. an unknown keyword or a `max_tokens` too large to answer
without streaming).
"""

from __future__ import annotations

from dataclasses import dataclass

import anthropic

from service.contracts.reasons import Reason

# error_code values meaning money, not rate: waiting a minute does not help.
SPEND_LIMIT_CODES = frozenset(
    {
        "enforced_spend_limit_reached",
        "contract_spend_limit_reached",
        "linked_organization_spend_limit_reached",
    }
)


class InvalidParams(ValueError):
    """The SDK refused the request's parameters before sending it; the message is the SDK's."""

    label = "sdk_refused"

    def failure(self) -> Failure:
        return Failure(False, Reason.INVALID_REQUEST, self.label)


@dataclass(frozen=True, slots=True)
class Failure:
    """What one failed upstream attempt means."""

    retryable: bool
    reason: Reason
    label: str
    """Short bounded label for metrics (`rate_limited`, `overloaded`, ...)."""
    status: int | None = None
    error_type: str | None = None
    error_code: str | None = None
    request_id: str | None = None
    retry_after_s: float | None = None
    rate_limited: bool = False
    """A 429: the scheduler pauses the scope it is about (the org pool, or the key's workspace)."""


_NON_RETRYABLE_STATUS: dict[int, tuple[Reason, str]] = {
    400: (Reason.INVALID_REQUEST, "invalid_request"),
    401: (Reason.UPSTREAM_AUTHENTICATION, "authentication"),
    402: (Reason.UPSTREAM_SPEND_LIMIT, "payment_required"),
    403: (Reason.UPSTREAM_PERMISSION, "permission"),
    404: (Reason.UPSTREAM_NOT_FOUND, "not_found"),
    413: (Reason.UPSTREAM_TOO_LARGE, "too_large"),
    422: (Reason.INVALID_REQUEST, "invalid_request"),
}
_RETRYABLE_STATUS: dict[int, str] = {
    408: "timeout",
    409: "conflict",
    429: "rate_limited",
    500: "server_error",
    502: "server_error",
    503: "unavailable",
    504: "gateway_timeout",
    529: "overloaded",
}


ABSURD_RETRY_AFTER_S = 86_400.0
"""A `retry-after` beyond a day is not a rate limit's (those refill within a minute): ignored."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `retry-after` header (delta-seconds form), or None when absent, unreadable,
    negative, infinite, NaN or absurd (over `ABSURD_RETRY_AFTER_S`)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= ABSURD_RETRY_AFTER_S else None


def classify(exc: BaseException) -> Failure:
    """What to do about `exc`, raised by an upstream call."""
    if isinstance(exc, anthropic.APIStatusError):
        return _classify_status(exc)
    if isinstance(exc, anthropic.APITimeoutError):
        return Failure(True, Reason.RETRIES_EXHAUSTED, "timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return Failure(True, Reason.RETRIES_EXHAUSTED, "connection")
    if isinstance(exc, anthropic.APIResponseValidationError):
        return Failure(True, Reason.RETRIES_EXHAUSTED, "invalid_response", status=exc.status_code)
    if isinstance(exc, anthropic.RetryableError):
        return Failure(True, Reason.RETRIES_EXHAUSTED, "retryable")
    if isinstance(exc, anthropic.CredentialsError):
        return Failure(False, Reason.UPSTREAM_AUTHENTICATION, "credentials")
    if isinstance(exc, anthropic.AnthropicError):
        return Failure(False, Reason.UPSTREAM_REJECTED, "client_error")
    raise TypeError(f"not an anthropic SDK error: {type(exc).__name__}") from exc


_NOT_SENT = ("ConnectError", "ConnectTimeout", "PoolTimeout", "UnsupportedProtocol", "LocalProtocolError")


def may_have_been_sent(exc: BaseException) -> bool:
    """Whether a failed call without an HTTP answer may have reached Claude (and been billed).

    Only a failure to connect (or to get a pooled connection) proves the request was
    never sent; a read timeout or a dropped connection after sending does not: its
    outcome is unknown. Judged by the httpx2 exception class the SDK wrapped."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if type(cause).__name__ in _NOT_SENT:
            return False
        cause = cause.__cause__ or cause.__context__
    return True


def _classify_status(exc: anthropic.APIStatusError) -> Failure:
    status = exc.status_code

    def failure(retryable: bool, reason: Reason, label: str, retry_after_s: float | None = None) -> Failure:
        return Failure(
            retryable,
            reason,
            label,
            status=status,
            error_type=exc.type,
            error_code=exc.error_code,
            request_id=exc.request_id,
            retry_after_s=retry_after_s,
            rate_limited=status == 429 and retryable,
        )

    if exc.error_code in SPEND_LIMIT_CODES:
        return failure(False, Reason.UPSTREAM_SPEND_LIMIT, "spend_limit")
    if status in _NON_RETRYABLE_STATUS:
        reason, label = _NON_RETRYABLE_STATUS[status]
        return failure(False, reason, label)
    retry_label = _RETRYABLE_STATUS.get(status) or ("server_error" if status >= 500 else None)
    if retry_label is not None:
        retry_after = parse_retry_after(exc.response.headers.get("retry-after"))
        return failure(True, Reason.RETRIES_EXHAUSTED, retry_label, retry_after)
    return failure(False, Reason.UPSTREAM_REJECTED, f"status_{status // 100}xx")


def status_class(status: int | None) -> str:
    """The `status` label of the upstream-calls metric: 2xx, 4xx, 5xx, or error (no answer)."""
    return "error" if status is None else f"{status // 100}xx"


def describe(failure: Failure, exc: BaseException) -> str:
    """A dead letter's detail for a failed call (the API's message cut to 300 characters)."""
    if isinstance(exc, anthropic.APIStatusError):
        msg = (exc.api_message or "")[:300]
        return f"HTTP {exc.status_code} {exc.type or ''}: {msg}".strip()
    return f"{failure.label}: {type(exc).__name__}"
