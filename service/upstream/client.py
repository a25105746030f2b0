"""Call Claude's Messages API with a partner's own key, returning body and headers.

One `AsyncAnthropic` per partner key, all sharing one HTTP connection pool.
The SDK never retries (`max_retries=0`): the service's policy does, through
the limiter. The SDK's own OpenTelemetry instrumentation makes the CLIENT span.

The SDK warns from inside `create()` about the request (a model past its deprecation date,
`DeprecationWarning`; thinking on some models, `UserWarning`). A warning must never fail a
call: under `-W error` or `PYTHONWARNINGS=error` it would raise, and every request for that
model would become an `internal_error` dead letter. So the SDK's warnings raised through
`create_message` are ignored (`quiet_sdk_warnings`, installed with each client), and the
gateway says once per model, as a log line, that partners call a deprecated model and when
it reaches end of life (the SDK's own table), and whether that date has passed (Anthropic
then retires the model: its calls may be refused, and end as dead letters with its answer).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, cast

import anthropic
import httpx2
import orjson
from pydantic import SecretStr

from service.config.settings import AnthropicSettings
from service.upstream.errors import InvalidParams

try:  # the SDK's table of deprecated models and their end-of-life dates (what it warns from)
    from anthropic._data import DEPRECATED_MODELS
except ImportError:  # pragma: no cover - a later SDK may move it: then no notice, calls unchanged
    DEPRECATED_MODELS = {}

_SDK_DATE = re.compile(r"([A-Z][a-z]+) (\d{1,2})(?:st|nd|rd|th)?, (\d{4})")
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
REQUEST_KEY_HEADER = "x-gateway-request-id"
log = logging.getLogger("service.upstream")


def end_of_life_passed(text: str, today: date) -> bool | None:
    """Whether the SDK's end-of-life date ("November 30th, 2026") is before `today`; None when
    its wording is not such a date."""
    m = _SDK_DATE.fullmatch(text.strip())
    if m is None or m[1] not in _MONTHS:
        return None
    try:
        day = date(int(m[3]), _MONTHS.index(m[1]) + 1, int(m[2]))  # English names, whatever the locale
    except ValueError:
        return None
    return day < today


def quiet_sdk_warnings() -> None:
    """Ignore the warnings the SDK's `create()` raises through `create_message` (attributed to
    this module by their `stacklevel`), whatever the process's warning filters say."""
    warnings.filterwarnings("ignore", module=rf"{__name__.replace('.', '[.]')}$")


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    body: dict[str, Any]
    headers: Mapping[str, str]
    request_id: str | None
    elapsed_s: float


class UnknownPartnerKey(LookupError):
    """No Anthropic key is loaded for this partner."""


class ClaudeClient:
    """Per-partner Claude clients over one shared connection pool."""

    def __init__(
        self,
        settings: AnthropicSettings,
        *,
        http_client: httpx2.AsyncClient | None = None,
        open_telemetry: anthropic.OpenTelemetryClientOption = None,
    ) -> None:
        self._settings = settings
        self._own_http = http_client is None
        self._http = http_client or httpx2.AsyncClient(
            timeout=httpx2.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx2.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_connections,
            ),
        )
        self._open_telemetry = open_telemetry
        self._clients: dict[str, anthropic.AsyncAnthropic] = {}
        self._keys: dict[str, SecretStr] = {}
        self._deprecated_seen: set[str] = set()
        quiet_sdk_warnings()

    def sync_keys(self, keys: Mapping[str, SecretStr]) -> None:
        """Hold exactly these partners' keys: new and rotated keys are used by the next
        call, a partner no longer listed has no client left."""
        for partner_id in self._keys.keys() - keys.keys():
            del self._keys[partner_id]
            del self._clients[partner_id]
        for partner_id, key in keys.items():
            if self._keys.get(partner_id) != key:
                self._keys[partner_id] = key
                self._clients[partner_id] = anthropic.AsyncAnthropic(
                    api_key=key.get_secret_value(),
                    base_url=self._settings.base_url,
                    max_retries=0,
                    timeout=self._settings.timeout_s,
                    http_client=self._http,
                    open_telemetry=self._open_telemetry,
                )

    async def create_message(
        self, partner_id: str, params: Mapping[str, Any], *, request_key: str | None = None
    ) -> UpstreamResult:
        """One Messages API call. Raises the SDK's exceptions unchanged, except a `TypeError` or
        `ValueError` of `create()` itself, which becomes `InvalidParams`. `request_key`
        (partner:request id) goes in `x-gateway-request-id`, so calls per request can be
        counted upstream (the simulator does)."""
        client = self._clients.get(partner_id)
        if client is None:
            raise UnknownPartnerKey(partner_id)
        self._notice_deprecated(partner_id, params.get("model"))
        started = time.perf_counter()
        extra = {REQUEST_KEY_HEADER: request_key} if request_key is not None else None
        try:
            raw = await cast(Any, client.messages.with_raw_response).create(**params, extra_headers=extra)
        except (TypeError, ValueError) as exc:
            # raised while the SDK binds and encodes the arguments, before any byte is sent
            # (transport failures come back as APIConnectionError): the request's content
            raise InvalidParams(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        content = await raw.read()
        body = orjson.loads(content)
        if not isinstance(body, dict):  # a 200 that is no Message: maybe billed, so not ours to
            # read further (the pipeline would fail past the call, holding its turn and its grant)
            raise anthropic.APIResponseValidationError(
                raw.http_response, body, message="the answer's body is not a JSON object"
            )
        headers = raw.headers
        return UpstreamResult(
            body=body,
            headers=headers,
            request_id=headers.get("request-id"),
            elapsed_s=time.perf_counter() - started,
        )

    def _notice_deprecated(self, partner_id: str, model: object) -> None:
        if not isinstance(model, str) or model not in DEPRECATED_MODELS or model in self._deprecated_seen:
            return
        self._deprecated_seen.add(model)
        eol = DEPRECATED_MODELS[model]
        past = end_of_life_passed(eol, datetime.now(UTC).date())
        log.warning(
            "a partner calls a model Anthropic has deprecated"
            + (", past its end of life: Anthropic may refuse it" if past else "")
            + "; it is called as asked",
            extra={"partner": partner_id, "model": model, "end_of_life": eol, "past_end_of_life": past},
        )

    def batches(self, partner_id: str) -> Any:
        """The partner key's Message Batches resource (`client.messages.batches`)."""
        client = self._clients.get(partner_id)
        if client is None:
            raise UnknownPartnerKey(partner_id)
        return client.messages.batches

    async def aclose(self) -> None:
        self._clients.clear()
        if self._own_http:
            await self._http.aclose()
