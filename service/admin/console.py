"""The admin console: `/admin` (HTML) and `/admin/api/*` (JSON) on the gateway's HTTP port.

Off unless the config has an `admin` section. Every route asks for the token
that `admin.token` refers to:

- the API: `Authorization: Bearer <token>`;
- the page: a login form; the session cookie is an HMAC of the token (never the
  token itself), `HttpOnly`, `SameSite=Strict`, path `/admin`, and stops working
  when the token is rotated. Forms carry a CSRF token derived the same way.

Routes:

| method | path | what |
| --- | --- | --- |
| GET | `/admin` | the page (the login form without a session) |
| POST | `/admin/login`, `/admin/logout` | the session cookie |
| POST | `/admin/partners/{id}/{pause,drain,resume}` | an action from the page (303 back to it) |
| GET | `/admin/api/state` | the state document (`state.py`) |
| POST | `/admin/api/partners/{id}/{pause,drain,resume}` | an action; answers the partner's new state |

Each action is audited (`partner_paused`, `partner_drained`, `partner_resumed`),
with who (`operator` field, else "admin"), the replica and the remote address.
A refused token is logged (without the value) and answered after a short delay.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import SecretStr
from redis.exceptions import RedisError

from service.admin import page
from service.admin.pauses import Mode, Pauses, new_hold
from service.admin.replicas import Replicas
from service.admin.state import snapshot
from service.admin.tallies import Tallies
from service.config.settings import GatewaySettings

if TYPE_CHECKING:
    from service.app import Gateway

log = logging.getLogger(__name__)

COOKIE = "gateway_admin"
ACTIONS: dict[str, Mode | None] = {"pause": "paused", "drain": "draining", "resume": None}
AUDIT_EVENTS = {"pause": "partner_paused", "drain": "partner_drained", "resume": "partner_resumed"}
REFUSED_DELAY_S = 0.5
FORM_TIMEOUT_S = 10.0
"""A form body (login, an action) must arrive within this: a client that stops sending holds
nothing for long."""
MAX_FORM_BYTES = 16 * 1024
_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
_OPERATOR = re.compile(r"[^A-Za-z0-9@._ -]")


def _derive(token: SecretStr, purpose: bytes) -> str:
    return hmac.new(token.get_secret_value().encode(), purpose, hashlib.sha256).hexdigest()


class Console:
    """The console's state (pauses, tallies, replicas) and its HTTP routes."""

    def __init__(self, gateway: Gateway, token: SecretStr | None) -> None:
        self.gateway = gateway
        self._token = token
        prefix = gateway.settings.redis.key_prefix if gateway.settings.redis else "claude-gateway"
        epoch = gateway.redis_health.epoch if gateway.redis_health is not None else None
        self.pauses = Pauses(gateway.redis, prefix, epoch)
        self.tallies = Tallies(gateway.metrics, gateway.redis, prefix)
        self.replicas = Replicas(gateway.ingest.owner, self._describe, gateway.redis, prefix)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def reload(self, settings: GatewaySettings) -> None:
        """A new token takes effect at once (sessions of the old one end)."""
        self._token = settings.admin.token.resolve() if settings.admin is not None else None

    def _describe(self) -> dict[str, Any]:
        ready, _ = self.gateway.readiness()
        return {"ready": ready, "partitions": len(self.gateway.ingest.ownership.writers)}

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the shared pause state, the tallies and this replica's announcement current."""
        await self.pauses.sync()
        await asyncio.gather(self.pauses.run(stop), self.tallies.run(stop), self.replicas.run(stop))

    # -- routes -----------------------------------------------------------------------------

    def mount(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/admin", self._page)
        r.add_get("/admin/", self._page)
        r.add_post("/admin/login", self._login)
        r.add_post("/admin/logout", self._logout)
        r.add_post("/admin/partners/{partner}/{action}", self._form_action)
        r.add_get("/admin/api/state", self._api_state)
        r.add_post("/admin/api/partners/{partner}/{action}", self._api_action)

    def _bearer_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if self._token is None or scheme.lower() != "bearer" or not given:
            return False
        return hmac.compare_digest(given.strip().encode(), self._token.get_secret_value().encode())

    def _session_ok(self, request: web.Request) -> bool:
        cookie = request.cookies.get(COOKIE, "")
        if self._token is None or not cookie:
            return False
        return hmac.compare_digest(cookie.encode(), _derive(self._token, b"session").encode())

    def _csrf(self) -> str:
        assert self._token is not None
        return _derive(self._token, b"csrf")

    @staticmethod
    def _bounded(request: web.Request) -> None:
        """413 at once for a body said to be over `MAX_FORM_BYTES`, before anything waits (a
        refusal's half second would let a megabyte arrive, and be held, per connection)."""
        if (request.content_length or 0) > MAX_FORM_BYTES:
            refused = web.HTTPRequestEntityTooLarge(MAX_FORM_BYTES, request.content_length or 0)
            refused.force_close()  # its body is not read after the answer either
            raise refused

    async def _form(self, request: web.Request) -> Any:
        self._bounded(request)
        try:
            async with asyncio.timeout(FORM_TIMEOUT_S):
                return await request.post()
        except TimeoutError:
            raise web.HTTPRequestTimeout() from None

    async def _refused(self, request: web.Request, what: str) -> None:
        log.warning("admin console: access refused", extra={"remote": request.remote, "what": what})
        await asyncio.sleep(REFUSED_DELAY_S)

    @staticmethod
    def _html(body: str, status: int = 200) -> web.Response:
        return web.Response(
            text=body,
            status=status,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": _CSP,
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def _page(self, request: web.Request) -> web.Response:
        if not (self._session_ok(request) or self._bearer_ok(request)):
            return self._html(page.login(), status=401)
        state = await snapshot(self.gateway, self)
        refresh = request.query.get("refresh", "")
        refresh_s = int(refresh) if refresh.isascii() and refresh.isdigit() and len(refresh) <= 6 else None
        notice = request.query.get("done", "")[:200]
        return self._html(page.render(state, self._csrf(), refresh_s=refresh_s, notice=notice))

    async def _login(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        given = str(form.get("token", ""))
        token = self._token
        if token is None or not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            await self._refused(request, "login")
            return self._html(page.login("That token is not the admin token."), status=401)
        log.info("admin console: logged in", extra={"remote": request.remote})
        response = web.HTTPSeeOther("/admin")
        response.set_cookie(
            COOKIE, _derive(token, b"session"), path="/admin", httponly=True, samesite="Strict"
        )
        raise response

    async def _logout(self, _: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/admin")
        response.del_cookie(COOKIE, path="/admin")
        raise response

    async def _form_action(self, request: web.Request) -> web.Response:
        self._bounded(request)
        if not self._session_ok(request):  # before reading a body: an outsider's costs nothing
            await self._refused(request, "form action")
            refused = self._html(page.login("Log in again to act."), status=403)
            refused.force_close()  # nor is its body read after the answer (aiohttp's lingering)
            return refused
        form = await self._form(request)
        csrf = str(form.get("csrf", ""))
        if not self._session_ok(request) or not hmac.compare_digest(csrf.encode(), self._csrf().encode()):
            await self._refused(request, "form action")
            return self._html(page.login("Log in again to act."), status=403)
        status, doc = await self._act(request, str(form.get("operator", "") or "admin"))
        if status != 200:
            return self._html(page.login(str(doc.get("error"))), status=status)
        raise web.HTTPSeeOther(f"/admin?done={doc['partner']}+{doc['state']}")

    async def _api_state(self, request: web.Request) -> web.Response:
        if not (self._bearer_ok(request) or self._session_ok(request)):
            await self._refused(request, "api state")
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response(await snapshot(self.gateway, self), headers={"Cache-Control": "no-store"})

    async def _api_action(self, request: web.Request) -> web.Response:
        if not self._bearer_ok(request):  # no cookie here: a script must hold the token itself
            await self._refused(request, "api action")
            return web.json_response({"error": "unauthorized"}, status=401)
        operator = request.headers.get("X-Operator", "") or "admin"
        status, doc = await self._act(request, operator)
        return web.json_response(doc, status=status)

    # -- actions ----------------------------------------------------------------------------

    async def _act(self, request: web.Request, operator: str) -> tuple[int, dict[str, Any]]:
        pid, action = request.match_info["partner"], request.match_info["action"]
        if action not in ACTIONS:
            return 404, {"error": f"unknown action {action!r}: one of {', '.join(ACTIONS)}"}
        if pid not in self.gateway.registry.by_id:
            return 404, {"error": f"unknown partner {pid!r}"}
        by = _OPERATOR.sub("", operator)[:64] or "admin"
        mode = ACTIONS[action]
        hold = None if mode is None else new_hold(mode, by, self.gateway.ingest.owner)
        try:
            await self.pauses.set(pid, hold)
        except (RedisError, OSError, TimeoutError) as exc:
            log.error(
                "admin action not applied: the shared store failed", extra={"partner": pid, "action": action}
            )
            return 503, {
                "error": f"the shared state store did not answer ({type(exc).__name__}); nothing changed"
            }
        self.gateway.audit.emit(
            AUDIT_EVENTS[action], pid, by=by, replica=self.gateway.ingest.owner, remote=request.remote
        )
        return 200, {"partner": pid, "state": mode or "running", "by": by}
