"""aiohttp handlers: the Messages API routes and the `/_sim/*` control routes.

The order of checks for `/v1/messages` follows the real API: key, version
header, body size, JSON, body fields, model; then an injected fault
(500/529/spend-limit 429 at once), rate-limit admission (429 with
`retry-after`), the output draw, latency, OTPM settlement and the answer, or
a dropped connection. Every answer carries `request-id` and the twelve
`anthropic-ratelimit-*` headers of the bucket set the model draws on.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from service.simulator.buckets import BucketSet, Refusal
from service.simulator.calls import request_key
from service.simulator.completion import draw_completion, message_of
from service.simulator.config import SimulatorConfig, SimulatorConfigError, updated_config
from service.simulator.engine import SimulatorEngine
from service.simulator.errors import (
    ApiError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
)
from service.simulator.faults import Fault, draw_fault, fault_error
from service.simulator.headers import ratelimit_headers
from service.simulator.sampling import draw_latency_s
from service.simulator.stats import DROPPED
from service.simulator.tokens import count_input_tokens
from service.simulator.validation import validate_count_tokens, validate_messages

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
#: Paths that exist with other methods: 405 rather than 404.
_API_PATHS = re.compile(r"/v1/messages(/count_tokens|/batches(/[^/]+(/cancel|/results)?)?)?")
_JSON = "application/json"
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
_CALL_FILTERS = ("min_ok", "min_billed", "min_all")

# Indirection so that tests can check that zero latency never sleeps.
_sleep = asyncio.sleep


def _json(status: int, body: bytes, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, body=body, headers=headers, content_type=_JSON)


class Handlers:
    """Route handlers bound to one engine."""

    def __init__(self, engine: SimulatorEngine) -> None:
        self.engine = engine

    # -- helpers -----------------------------------------------------------------

    def headers_for(self, request_id: str, buckets: BucketSet) -> dict[str, str]:
        engine = self.engine
        headers = ratelimit_headers(buckets, engine.wall_clock(), engine.config.round_remaining)
        headers["request-id"] = request_id
        return headers

    def error_response(
        self, exc: ApiError, request_id: str, buckets: BucketSet, retry_after_s: int | None = None
    ) -> web.Response:
        self.engine.stats.status(exc.status)
        headers = self.headers_for(request_id, buckets)
        if retry_after_s is not None:
            headers["retry-after"] = str(retry_after_s)
        return _json(exc.status, exc.body(request_id), headers)

    def rate_limited(self, refusal: Refusal, request_id: str, buckets: BucketSet) -> web.Response:
        self.engine.stats.rate_limited_429 += 1
        what = ", ".join(refusal.buckets)
        whose = "workspace's" if what.startswith("workspace") else "organization's"
        if refusal.never:
            message = f"This request would exceed your {whose} per-minute limit ({what}) on its own."
        else:
            message = f"This request would exceed your {whose} rate limit ({what}); retry later."
        return self.error_response(RateLimitError(message), request_id, buckets, refusal.retry_after_s)

    async def read_json(
        self,
        request: web.Request,
        limit: int | None = None,
        too_large: Callable[[int], ApiError] | None = None,
    ) -> Any:
        """The JSON body, at most `limit` bytes (default `max_body_bytes`, else 413 or `too_large`)."""
        if limit is None:
            limit = self.engine.config.max_body_bytes
        refuse = too_large or _too_large
        length = request.content_length
        if length is not None:
            if length > limit:
                await _drain(request)
                raise refuse(limit)
            raw = await request.read()
        else:
            chunks: list[bytes] = []
            size = 0
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    await _drain(request)
                    raise refuse(limit)
                chunks.append(chunk)
            raw = b"".join(chunks)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None

    # -- /v1/messages --------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/messages`."""
        engine = self.engine
        stats = engine.stats
        request_id = engine.next_request_id()
        buckets = engine.limiter.default
        stats.call("messages")
        stats.in_flight += 1
        call_key = request_key(request.headers, None)
        ok = billed = False
        try:
            try:
                key_name = engine.authenticate(request.headers)
                engine.check_version(request.headers)
            except ApiError as exc:
                return self.error_response(exc, request_id, buckets)
            model: str | None = None
            config = engine.config
            try:
                body = await self.read_json(request)
                if call_key is None:
                    call_key = request_key(request.headers, body)
                if isinstance(body, Mapping) and isinstance(body.get("model"), str):
                    model = body["model"]
                    buckets = engine.limiter.for_key(key_name, engine.limiter.for_model(model))
                validate_messages(body, engine.models, config.max_tokens_limit)
            except ApiError as exc:
                stats.identified(key_name, model)
                return self.error_response(exc, request_id, buckets)
            stats.identified(key_name, model)
            response = await self._complete(body, config, request_id, buckets, key_name)
            if response is None:
                # Dropped: close the connection without an answer. aiohttp then fails
                # to write the placeholder with a ConnectionError, which it ignores quietly.
                billed = True  # the work was done before the drop
                stats.status(DROPPED)
                _drop_connection(request)
                return web.Response(status=500)
            ok = billed = response.status == 200
            return response
        finally:
            stats.requests.record(call_key, ok=ok, billed=billed)
            stats.in_flight -= 1

    async def _complete(
        self,
        body: Mapping[str, Any],
        config: SimulatorConfig,
        request_id: str,
        buckets: BucketSet,
        key_name: str | None = None,
    ) -> web.Response | None:
        """Fault, admission, output, latency, settlement; None means drop the connection."""
        engine = self.engine
        rng = engine.rng
        fault = draw_fault(rng, config.faults)
        error = fault_error(fault)
        if error is not None:
            if fault is Fault.SPEND_LIMIT:
                engine.stats.spend_limit_429 += 1
            return self.error_response(error, request_id, buckets)

        input_tokens = count_input_tokens(body)
        max_tokens: int = body["max_tokens"]
        cache = engine.prompt_cache.plan(str(body["model"]), body, input_tokens)
        refusal = buckets.try_admit(input_tokens - cache.read, max_tokens)  # ITPM: reads are free
        if refusal is not None:
            return self.rate_limited(refusal, request_id, buckets)

        completion = draw_completion(rng, config.output, body)
        latency_s = draw_latency_s(rng, config.latency, completion.output_tokens)
        try:
            if latency_s > 0:
                await _sleep(latency_s)
        finally:  # settle even if the handler is cancelled while "generating"
            buckets.settle_output(max_tokens, completion.output_tokens)
        engine.stats.billed(input_tokens, completion.output_tokens, key_name)
        engine.prompt_cache.commit(cache)

        if fault is Fault.DROP:
            return None

        message = message_of(
            engine.next_message_id(),
            body,
            input_tokens,
            completion,
            priority_tier=config.priority_tier,
            cache=cache,
        )
        engine.stats.status(200)
        return _json(200, orjson.dumps(message), self.headers_for(request_id, buckets))

    # -- /v1/messages/count_tokens -----------------------------------------------------

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/messages/count_tokens`: free, own RPM bucket, same token rule as messages."""
        engine = self.engine
        stats = engine.stats
        request_id = engine.next_request_id()
        buckets = engine.limiter.default
        stats.call("count_tokens")
        key_name: str | None = None
        model: str | None = None
        try:
            key_name = engine.authenticate(request.headers)
            engine.check_version(request.headers)
            body = await self.read_json(request)
            if isinstance(body, Mapping) and isinstance(body.get("model"), str):
                model = body["model"]
                buckets = engine.limiter.for_model(model)
            validate_count_tokens(body, engine.models)
        except ApiError as exc:
            stats.identified(key_name, model)
            return self.error_response(exc, request_id, buckets)
        stats.identified(key_name, model)
        refusal = engine.limiter.try_count_tokens()
        if refusal is not None:
            return self.rate_limited(refusal, request_id, buckets)
        tokens = count_input_tokens(body)
        stats.count_tokens_input_tokens_total += tokens
        stats.status(200)
        return _json(200, orjson.dumps({"input_tokens": tokens}), self.headers_for(request_id, buckets))

    # -- fallbacks and control routes ------------------------------------------------

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        """Any other path or method: Anthropic-shaped 404/405."""
        request_id = self.engine.next_request_id()
        buckets = self.engine.limiter.default
        if _API_PATHS.fullmatch(request.path):
            exc: ApiError = _MethodNotAllowed(f"Method {request.method} not allowed for {request.path}")
        else:
            exc = NotFoundError(f"Not found: {request.method} {request.path}")
        return _json(exc.status, exc.body(request_id), self.headers_for(request_id, buckets))

    def _control(self, status: int, body: bytes) -> web.Response:
        return _json(status, body, {"request-id": self.engine.next_request_id()})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        """`GET /_sim/stats`."""
        return self._control(200, orjson.dumps(self.engine.snapshot()))

    async def calls(self, request: web.Request) -> web.StreamResponse:
        """`GET /_sim/calls[?min_ok=N&min_billed=N&min_all=N]`: calls per request (calls.py)."""
        try:
            minimums = {name: int(request.query.get(name, "0")) for name in _CALL_FILTERS}
        except ValueError:
            message = f"{', '.join(_CALL_FILTERS)} must be integers"
            return self._control(400, InvalidRequestError(message).body())
        return self._control(200, orjson.dumps(self.engine.stats.calls(**minimums)))

    async def reset(self, request: web.Request) -> web.StreamResponse:
        """`POST /_sim/reset`: zero the stats, fill the buckets (`?buckets=empty`: empty them, so
        that a load test starts at saturation instead of spending a minute's burst), re-seed."""
        self.engine.reset(empty=request.query.get("buckets") == "empty")
        return self._control(200, b'{"reset":true}')

    async def get_config(self, request: web.Request) -> web.StreamResponse:
        """`GET /_sim/config`: the current config, keys hidden."""
        return self._control(200, self.engine.config.model_dump_json().encode())

    async def post_config(self, request: web.Request) -> web.StreamResponse:
        """`POST /_sim/config`: deep-merge a partial config (e.g. `{"faults": {...}}`)."""
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise SimulatorConfigError("the config update must be a JSON object")
            if "host" in changes or "port" in changes:
                raise SimulatorConfigError("host and port cannot change at runtime")
            config = updated_config(self.engine.config, changes)
        except (orjson.JSONDecodeError, SimulatorConfigError) as exc:
            return self._control(400, InvalidRequestError(str(exc)).body())
        self.engine.reconfigure(config)
        return self._control(200, config.model_dump_json().encode())


class _MethodNotAllowed(ApiError):
    status = 405
    error_type = "invalid_request_error"


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"Request exceeds the maximum allowed size of {limit} bytes")


async def _drain(request: web.Request) -> None:
    """Read and discard the body (up to a cap) so that the client sees our answer."""
    seen = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        seen += len(chunk)
        if seen > _DRAIN_LIMIT_BYTES:
            break


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
