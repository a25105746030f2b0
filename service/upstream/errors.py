"""Map every anthropic SDK exception to what the service does about it.

Classification is by exception class (and the stable `error_code`), never by
message text. Each class of the SDK has a tested mapping:

    AnthropicError
    ├── APIError
    │   ├── APIStatusError ── one subclass per HTTP status (400 ... 529)
    │   ├── APIConnectionError ── APITimeoutError        -> retry
    │   │   (but a request the HTTP client could not write  -> dead letter, `invalid_request`)
    │   ├── APIResponseValidationError                   -> retry (a garbled answer)
    │   └── APIWebhookValidationError                    -> not a Messages outcome: dead letter
    ├── RetryableError                                   -> retry
    └── CredentialsError ── IdentityTokenFileError       -> dead letter (key unusable)

A 400 is the partner's request content (`invalid_request`, with Claude's message), as is
`InvalidParams`: the SDK refusing the arguments before it sends anything (a `TypeError` or
`ValueError` from `create()`, e.g. an unknown keyword or a `max_tokens` too large to answer
without streaming).

So is a request the HTTP client refused to write (an `APIConnectionError` wrapping a
`LocalProtocolError`, e.g. a header value with a line break): nothing was sent, and the same
request would fail the same way every time. Its detail names the header (and the params field
it comes from) but never quotes a header's value: they carry the partner's API key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import anthropic

from service.contracts.params import HEADER_FIELDS
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
        if _unwritable(exc) is not None:
            return Failure(False, Reason.INVALID_REQUEST, UNWRITABLE)
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
_LOCAL_PROTOCOL_ERROR = "LocalProtocolError"
"""The class the HTTP stack raises when it refuses to write a request (h11's, wrapped by httpcore2's,
wrapped by httpx2's, which the SDK wraps in `APIConnectionError`): not a connection failure."""
UNWRITABLE = "unwritable_request"
"""The label of a request the HTTP client refused to write."""
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
"""A header value h11 writes (`h11._abnf.field_value`), used with fullmatch."""
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
"""A header name h11 writes (`h11._abnf.token`)."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it was raised from or during, outermost first, each once."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def may_have_been_sent(exc: BaseException) -> bool:
    """Whether a failed call without an HTTP answer may have reached Claude (and been billed).

    Only a failure to connect (or to get a pooled connection) proves the request was
    never sent; a read timeout or a dropped connection after sending does not: its
    outcome is unknown. Judged by the httpx2 exception class the SDK wrapped."""
    return not any(type(cause).__name__ in _NOT_SENT for cause in _causes(exc))


def _unwritable(exc: BaseException) -> BaseException | None:
    """The `LocalProtocolError` `exc` was raised from, if the HTTP client refused to write the
    request (judged by class, as `may_have_been_sent` is), else None."""
    return next((c for c in _causes(exc) if type(c).__name__ == _LOCAL_PROTOCOL_ERROR), None)


def _unwritable_detail(exc: BaseException) -> str:
    """Why the request of `exc` could not be written, naming the headers HTTP cannot carry (and
    the params field each comes from) without their values: one of them is the API key."""
    cause = _unwritable(exc)
    what = type(cause).__name__ if cause is not None else type(exc).__name__
    detail = f"the request could not be sent: the HTTP client refused to write it ({what})"
    request = getattr(exc, "request", None)
    raw = getattr(getattr(request, "headers", None), "raw", None) or []
    fields = {header: name for name, header in HEADER_FIELDS.items()}
    bad_values: list[str] = []
    bad_names = 0
    for name, value in raw:
        if not isinstance(name, bytes) or _FIELD_NAME.fullmatch(name) is None:
            bad_names += 1
        elif not isinstance(value, bytes) or _FIELD_VALUE.fullmatch(value) is None:
            header = name.decode("ascii").lower()
            bad_values.append(f"{header} (params.{fields[header]})" if header in fields else header)
    if len(bad_values) == 1:
        detail += f": the value of header {bad_values[0]} is not a valid HTTP header value"
    elif bad_values:
        detail += f": the values of headers {', '.join(bad_values)} are not valid HTTP header values"
    if bad_names:
        detail += f"; {bad_names} header name{'s are' if bad_names > 1 else ' is'} not valid HTTP"
    return detail + "; nothing reached Claude"


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
    if failure.label == UNWRITABLE:
        return _unwritable_detail(exc)
    if isinstance(exc, anthropic.APIStatusError):
        msg = (exc.api_message or "")[:300]
        return f"HTTP {exc.status_code} {exc.type or ''}: {msg}".strip()
    return f"{failure.label}: {type(exc).__name__}"
