"""The simulator's aiohttp application: every route and the handler serving it."""

from __future__ import annotations

from aiohttp import web

from service.simulator.batches.handlers import add_batch_routes
from service.simulator.engine import SimulatorEngine
from service.simulator.handlers import COUNT_TOKENS_PATH, MESSAGES_PATH, Handlers

_UNBOUNDED_BYTES = 1 << 62


def build_app(engine: SimulatorEngine) -> web.Application:
    """The aiohttp application serving `engine`."""
    handlers = Handlers(engine)
    # The size limit is checked by the handlers (it can change at runtime), not by aiohttp.
    app = web.Application(client_max_size=_UNBOUNDED_BYTES)
    app.router.add_post(MESSAGES_PATH, handlers.messages)
    app.router.add_post(COUNT_TOKENS_PATH, handlers.count_tokens)
    add_batch_routes(app, handlers)
    app.router.add_get("/_sim/stats", handlers.stats)
    app.router.add_get("/_sim/calls", handlers.calls)
    app.router.add_post("/_sim/reset", handlers.reset)
    app.router.add_get("/_sim/config", handlers.get_config)
    app.router.add_post("/_sim/config", handlers.post_config)
    app.router.add_route("*", "/{tail:.*}", handlers.not_found)
    return app
