"""aiohttp handlers of the Message Batches API, as the anthropic SDK calls it.

    POST   /v1/messages/batches                 create   -> MessageBatch
    GET    /v1/messages/batches                 list     -> {data, has_more, first_id, last_id}
    GET    /v1/messages/batches/{id}            retrieve -> MessageBatch
    POST   /v1/messages/batches/{id}/cancel     cancel   -> MessageBatch (canceling)
    DELETE /v1/messages/batches/{id}            delete   -> DeletedMessageBatch (ended only)
    GET    /v1/messages/batches/{id}/results    results  -> JSONL (ended only)

Key and version are checked as for `/v1/messages`, errors have the same body (with
`request_id`) and every answer carries `request-id` and the key's rate-limit headers. A create
is one request against the key's RPM (and its workspace's), drawing no tokens; the other batch
calls draw on nothing. A batch belongs to its key's workspace: other workspaces get 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from service.simulator.batches.intake import parse_batch, too_large
from service.simulator.batches.model import CANCELING, IN_PROGRESS, Batch
from service.simulator.batches.processor import BatchProcessor, new_batch
from service.simulator.batches.results import result_chunks
from service.simulator.batches.store import CursorError
from service.simulator.buckets import BucketSet
from service.simulator.errors import (
    ApiError,
    InternalApiError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
)
from service.simulator.handlers import Handlers

BATCHES_PATH = "/v1/messages/batches"
DEFAULT_PAGE = 20
MAX_PAGE = 1000


@dataclass(slots=True)
class _Call:
    request_id: str
    buckets: BucketSet
    key_name: str = ""
    workspace: str | None = None


_Action = Callable[[web.Request, _Call], Awaitable[web.StreamResponse]]


def _origin(request: web.Request) -> str:
    return str(request.url.origin())


class BatchHandlers:
    """The batch routes, sharing the Messages handlers' auth, errors and headers."""

    def __init__(self, base: Handlers, processor: BatchProcessor) -> None:
        self.base = base
        self.engine = base.engine
        self.processor = processor

    async def _handle(self, request: web.Request, endpoint: str, action: _Action) -> web.StreamResponse:
        engine = self.engine
        limiter = engine.limiter
        call = _Call(engine.next_request_id(), limiter.default)
        engine.stats.call(endpoint)
        try:
            call.key_name = engine.authenticate(request.headers)
            engine.check_version(request.headers)
            call.buckets = limiter.for_key(call.key_name, limiter.default)
            call.workspace = limiter.workspace_of(call.key_name)
            engine.stats.identified(call.key_name, None)
            failure = self.processor.failure
            if failure is not None:
                raise InternalApiError(f"the simulator's batch processor failed: {failure!r}")
            return await action(request, call)
        except ApiError as exc:
            return self.base.error_response(exc, call.request_id, call.buckets)

    def _ok(self, call: _Call, doc: dict[str, Any]) -> web.Response:
        self.engine.stats.status(200)
        headers = self.base.headers_for(call.request_id, call.buckets)
        return web.Response(
            status=200, body=orjson.dumps(doc), headers=headers, content_type="application/json"
        )

    def _find(self, request: web.Request, call: _Call) -> Batch:
        batch_id = request.match_info["batch_id"]
        batch = self.engine.batches.get(batch_id, call.workspace)
        if batch is None:
            raise NotFoundError(f"message_batch {batch_id} not found")
        return batch

    # -- routes ----------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/messages/batches`."""
        return await self._handle(request, "batches.create", self._create)

    async def _create(self, request: web.Request, call: _Call) -> web.StreamResponse:
        engine = self.engine
        settings = engine.config.batches
        body = await self.base.read_json(request, settings.max_bytes, too_large)
        custom_ids, params = parse_batch(body, settings)
        refusal = call.buckets.try_request()
        if refusal is not None:
            return self.base.rate_limited(refusal, call.request_id, call.buckets)
        stats = engine.stats.batches
        limit = settings.max_queued_requests
        if limit is not None:
            queued = engine.batches.queued_requests()
            if queued + len(custom_ids) > limit:
                stats.queue_limited_429 += 1
                raise RateLimitError(
                    f"This batch of {len(custom_ids)} requests would exceed your organization's "
                    f"limit of {limit} batch requests in the processing queue ({queued} queued)."
                )
        batch = new_batch(engine, call.key_name, call.workspace, custom_ids, params)
        engine.batches.add(batch)
        stats.created += 1
        stats.requests_received += batch.size
        self.processor.kick()
        return self._ok(call, batch.as_json(_origin(request)))

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/messages/batches/{id}`."""
        return await self._handle(request, "batches.retrieve", self._retrieve)

    async def _retrieve(self, request: web.Request, call: _Call) -> web.StreamResponse:
        return self._ok(call, self._find(request, call).as_json(_origin(request)))

    async def list(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/messages/batches[?limit=&before_id=&after_id=]`: newest first."""
        return await self._handle(request, "batches.list", self._list)

    async def _list(self, request: web.Request, call: _Call) -> web.StreamResponse:
        query = request.query
        try:
            limit = int(query.get("limit", DEFAULT_PAGE))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequestError(f"limit: Input should be an integer from 1 to {MAX_PAGE}")
        before_id, after_id = query.get("before_id"), query.get("after_id")
        if before_id is not None and after_id is not None:
            raise InvalidRequestError("before_id and after_id cannot both be given")
        try:
            page, has_more = self.engine.batches.page(call.workspace, limit, before_id, after_id)
        except CursorError as exc:
            which = "before_id" if before_id is not None else "after_id"
            raise InvalidRequestError(f"{which}: {exc} is not a message batch id") from None
        origin = _origin(request)
        data = [batch.as_json(origin) for batch in page]
        return self._ok(
            call,
            {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            },
        )

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/messages/batches/{id}/cancel`: undecided entries end `canceled`."""
        return await self._handle(request, "batches.cancel", self._cancel)

    async def _cancel(self, request: web.Request, call: _Call) -> web.StreamResponse:
        batch = self._find(request, call)
        if batch.status == IN_PROGRESS:
            batch.status = CANCELING
            batch.cancel_initiated_s = self.engine.clock()
            self.engine.stats.batches.cancels += 1
            self.processor.kick()
        elif batch.status != CANCELING:
            raise InvalidRequestError(f"message_batch {batch.id} has ended; it cannot be canceled")
        return self._ok(call, batch.as_json(_origin(request)))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        """`DELETE /v1/messages/batches/{id}`: only an ended batch."""
        return await self._handle(request, "batches.delete", self._delete)

    async def _delete(self, request: web.Request, call: _Call) -> web.StreamResponse:
        batch = self._find(request, call)
        if not batch.ended:
            raise InvalidRequestError(
                f"message_batch {batch.id} is {batch.status}; only an ended batch can be deleted "
                "(cancel it first)"
            )
        self.engine.batches.delete(batch.id)
        self.engine.stats.batches.deleted += 1
        return self._ok(call, {"id": batch.id, "type": "message_batch_deleted"})

    async def results(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/messages/batches/{id}/results`: the JSONL file, once ended."""
        return await self._handle(request, "batches.results", self._results)

    async def _results(self, request: web.Request, call: _Call) -> web.StreamResponse:
        batch = self._find(request, call)
        if not batch.ended:
            raise InvalidRequestError(
                f"message_batch {batch.id} is {batch.status}; its results are available once it has ended"
            )
        self.engine.stats.status(200)
        response = web.StreamResponse(
            status=200, headers=self.base.headers_for(call.request_id, call.buckets)
        )
        response.content_type = "application/binary"
        await response.prepare(request)
        for chunk in result_chunks(batch):
            await response.write(chunk)
        await response.write_eof()
        return response


def add_batch_routes(app: web.Application, base: Handlers) -> None:
    """Serve the batch routes on `app`; its cleanup stops the processor."""
    processor = BatchProcessor(base.engine)
    handlers = BatchHandlers(base, processor)
    app.router.add_post(BATCHES_PATH, handlers.create)
    app.router.add_get(BATCHES_PATH, handlers.list)
    app.router.add_get(BATCHES_PATH + "/{batch_id}", handlers.retrieve)
    app.router.add_delete(BATCHES_PATH + "/{batch_id}", handlers.delete)
    app.router.add_post(BATCHES_PATH + "/{batch_id}/cancel", handlers.cancel)
    app.router.add_get(BATCHES_PATH + "/{batch_id}/results", handlers.results)

    async def stop_processor(app: web.Application) -> None:
        await processor.aclose()

    app.on_cleanup.append(stop_processor)
