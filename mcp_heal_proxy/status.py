"""The status page at ``/`` and the JSON endpoints behind it, under ``/_proxy/``.

Endpoints (documented in docs/operations.md):

* ``GET /``: the page (plain HTML, CSS and JS shipped in the package; no build step, no CDN);
* ``GET /_proxy/api/status``: everything the page shows, in one answer;
* ``GET /_proxy/api/upstreams``, ``/_proxy/api/sessions``, ``/_proxy/api/requests``, ``/_proxy/api/heals``;
* ``GET /_proxy/api/events``: the live feed (Server-Sent Events), read by the page and ``tail``;
* ``DELETE /_proxy/api/sessions/{id}``: end a session (upstream DELETE, bounded by the upstream's
  ``connect_timeout``, then the record), for ``mcp-heal-proxy sessions forget``.

Who may look: without ``[server] token``, loopback clients only, and only under a local host name
(a page elsewhere that rebinds its DNS name to 127.0.0.1 is refused). With a token, the bearer header
as on the MCP endpoint, or a cookie: a browser cannot send a bearer header on page load, so
``/?token=...`` once sets an HttpOnly cookie (a keyed hash of the token, useless on the MCP endpoint)
and redirects to ``/`` so the token leaves the address bar. Nothing shown is secret: no bodies, no
header values, no tokens, session ids cut to 8 characters.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web

from mcp_heal_proxy import __version__
from mcp_heal_proxy.config import MEMORY_STATE, STATUS_PREFIX, ProxyConfig, UpstreamConfig
from mcp_heal_proxy.constant_time import same_secret
from mcp_heal_proxy.display import mask_url
from mcp_heal_proxy.engine.endings import SessionEndings
from mcp_heal_proxy.errors import StoreUnavailable
from mcp_heal_proxy.events import EventFeed, entry_json
from mcp_heal_proxy.inventory import PAGE_SESSIONS, CachedStore, RedisReader, is_redis, most_recent, summary
from mcp_heal_proxy.store.records import SessionRecord, SessionStore
from mcp_heal_proxy.upstream.routes import proxy_for

API: Final = f"{STATUS_PREFIX}api"
EVENTS_PATH: Final = f"{API}/events"
PAGE_FILES: Final = Path(__file__).parent / "status_page"
_ASSETS: Final = {"status.css": "text/css", "status.js": "text/javascript", "favicon.svg": "image/svg+xml"}
COOKIE: Final = "mcp_heal_proxy_status"
LOCAL_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
}

ENDINGS_KEY = web.AppKey("session_endings", SessionEndings)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def upstream_display(url: str) -> str:
    """An upstream URL as the page shows it: masked as every other output masks it (display.mask_url:
    credentials and query values, where API keys live too)."""
    return mask_url(url)


def store_kind(state: str) -> str:
    """memory, redis or sqlite."""
    if state == MEMORY_STATE:
        return "memory"
    return "redis" if is_redis(state) else "sqlite"


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Access:
    """Decides who may see the page and its data (see the module docstring)."""

    def __init__(self, config: ProxyConfig) -> None:
        self._bearer = f"Bearer {config.token}".encode() if config.token else None
        self._cookie = (
            hmac.new(config.token.encode(), b"mcp-heal-proxy status page", hashlib.sha256).hexdigest()
            if config.token
            else None
        )
        origin_hosts = {urlsplit(origin).hostname for origin in config.allowed_origins}
        self._hosts = LOCAL_NAMES | {config.host} | {host for host in origin_hosts if host}

    @property
    def cookie_value(self) -> str | None:
        """The cookie that stands for the token on the status paths."""
        return self._cookie

    def token_matches(self, presented: str) -> bool:
        """Whether a ``?token=`` value is the inbound token (constant time)."""
        return self._bearer is not None and same_secret(f"Bearer {presented}", self._bearer)

    def refusal(self, request: web.Request) -> web.Response | None:
        """None when the request may see the page, else the answer that refuses it."""
        if self._bearer is not None and self._cookie is not None:
            presented = request.headers.get("Authorization", "")
            cookie = request.cookies.get(COOKIE, "")
            if same_secret(presented, self._bearer) or same_secret(cookie, self._cookie):
                return None
            return _refused(401, "this proxy has a token: open /?token=YOUR_TOKEN once, or send Authorization: Bearer")
        if not _is_loopback(request.remote):
            return _refused(403, "the status page answers loopback clients only (set [server] token to open it)")
        host = urlsplit(f"//{request.host}").hostname if request.host else None
        if host not in self._hosts:
            return _refused(403, "the status page answers under a local host name only")
        return None


def _refused(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers={"Cache-Control": "no-store"})


def _json(data: Any) -> web.Response:
    return web.json_response(data, headers={"Cache-Control": "no-store"}, dumps=_compact)


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _limit(request: web.Request, default: int, most: int) -> int:
    try:
        return max(1, min(most, int(request.query.get("limit", default))))
    except ValueError:
        return default


def _proxy_shown(upstream: UpstreamConfig) -> str | None:
    """The outbound proxy the upstream's requests go through, masked; None when they go direct."""
    route = proxy_for(upstream.url, upstream.proxy)
    return route.shown if route is not None else None


def add_routes(app: web.Application, config: ProxyConfig, feed: EventFeed, store_key: web.AppKey[SessionStore]) -> None:
    """Register the page, its assets and the JSON endpoints on the proxy's app."""
    access = Access(config)
    names = [upstream.name for upstream in config.upstreams]
    upstream_info = {
        upstream.name: {"path": upstream.path, "url": upstream_display(upstream.url), "proxy": _proxy_shown(upstream)}
        for upstream in config.upstreams
    }
    redis_reader: list[RedisReader] = []

    def guarded(handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            refused = access.refusal(request)
            return refused if refused is not None else await handler(request)

        return checked

    async def sessions(request: web.Request, limit: int) -> tuple[int, list[SessionRecord]]:
        store = request_store(request)
        if isinstance(store, CachedStore):
            records = store.records()
            return len(records), most_recent(records, limit)
        if is_redis(config.state):
            if not redis_reader:
                redis_reader.append(RedisReader(config.state))
            return await redis_reader[0].count(), await redis_reader[0].records(limit)
        return len(store), []

    def request_store(request: web.Request) -> SessionStore:
        if store_key not in request.app:
            raise StoreUnavailable("the proxy is starting")
        return request.app[store_key]

    def upstreams() -> list[dict[str, Any]]:
        return [{**health, **upstream_info[health["name"]]} for health in feed.upstreams(names)]

    async def sessions_json(request: web.Request, limit: int) -> dict[str, Any]:
        count, records = await sessions(request, limit)
        return {"count": count, "shown": [summary(record) for record in records]}

    async def page(request: web.Request) -> web.StreamResponse:
        token = request.query.get("token")
        if token is not None and access.cookie_value is not None:
            if not access.token_matches(token):
                return _refused(401, "wrong token")
            # Redirected at once, so that the token leaves the address bar and the history.
            response = web.Response(
                status=303, headers={"Location": "/", "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
            )
            response.set_cookie(COOKIE, access.cookie_value, httponly=True, samesite="Strict", path="/")
            return response
        refused = access.refusal(request)
        if refused is not None:
            return refused
        return web.FileResponse(PAGE_FILES / "index.html", headers={**_PAGE_HEADERS, "Content-Type": "text/html"})

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _ASSETS:
            return _refused(404, "no such file")
        return web.FileResponse(PAGE_FILES / name, headers={**_PAGE_HEADERS, "Content-Type": _ASSETS[name]})

    async def status(request: web.Request) -> web.StreamResponse:
        try:
            shown = await sessions_json(request, PAGE_SESSIONS)
        except StoreUnavailable as exc:
            shown = {"count": None, "shown": [], "error": exc.message}
        return _json(
            {
                "proxy": {
                    "version": __version__,
                    "started": round(feed.started, 3),
                    "now": round(time.time(), 3),
                    "store": store_kind(config.state),
                    "live_subscribers": feed.subscriber_count,
                },
                "upstreams": upstreams(),
                "sessions": shown,
                "heals": feed.heals(50),
                "requests": feed.requests(100),
                "seq": feed.last_seq,
            }
        )

    async def upstreams_page(_: web.Request) -> web.StreamResponse:
        return _json({"upstreams": upstreams()})

    async def sessions_page(request: web.Request) -> web.StreamResponse:
        try:
            return _json(await sessions_json(request, _limit(request, PAGE_SESSIONS, 10_000)))
        except StoreUnavailable as exc:
            return _refused(503, exc.message)

    async def requests_page(request: web.Request) -> web.StreamResponse:
        return _json({"requests": feed.requests(_limit(request, 100, 10_000))})

    async def heals_page(request: web.Request) -> web.StreamResponse:
        return _json({"heals": feed.heals(_limit(request, 50, 10_000))})

    async def events(request: web.Request) -> web.StreamResponse:
        subscription = feed.subscribe()
        if subscription is None:
            return _refused(503, "too many live subscribers")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        try:
            await response.prepare(request)
            hello = _compact({"version": __version__, "seq": feed.last_seq})
            await response.write(f"retry: 2000\nevent: hello\ndata: {hello}\n\n".encode())
            while True:
                batch = await subscription.next_batch(config.keepalive_interval)
                if subscription.closed:
                    break  # shutdown: end the stream now rather than hold the shutdown grace period
                chunks: list[str] = []
                if subscription.dropped:
                    dropped = _compact({"type": "dropped", "count": subscription.dropped})
                    chunks.append(f"event: dropped\ndata: {dropped}\n\n")
                    subscription.dropped = 0
                for entry in batch:
                    item = entry_json(entry)
                    chunks.append(f"event: {item['type']}\nid: {item['seq']}\ndata: {_compact(item)}\n\n")
                await response.write("".join(chunks).encode() if chunks else b": keep-alive\n\n")
        except ConnectionResetError:
            pass  # the reader left
        finally:
            feed.unsubscribe(subscription)
        return response

    async def forget(request: web.Request) -> web.StreamResponse:
        client_session_id = request.match_info["session"]
        try:
            store = request_store(request)
            record = await store.get(client_session_id, fresh=True)
        except StoreUnavailable as exc:
            return _refused(503, exc.message)
        if record is None:
            return _refused(404, "no such session")
        # The record goes first, then its upstream session: the other way round, the DELETE's own 404 to a
        # request of the client in between would heal the session onto a new upstream session, which
        # the record's deletion would then leave to nobody.
        try:
            await store.delete(record.client_session_id)
        except StoreUnavailable as exc:
            return _refused(503, exc.message)
        ending = await request.app[ENDINGS_KEY].end_now(record, "forgotten")
        return _json(
            {
                "session": record.client_session_id[:8],
                "upstream": record.upstream,
                "record_deleted": True,
                # 404 and 405 mean the upstream session is gone already or cannot be ended: done either way.
                "upstream_ended": ending.done,
                "upstream_status": ending.status,
                "upstream_error": ending.error,
            }
        )

    async def end_streams(_: web.Application) -> None:
        feed.close_subscribers()

    async def close_reader(_: web.Application) -> None:
        for reader in redis_reader:
            with contextlib.suppress(Exception):
                await reader.close()

    app.on_shutdown.append(end_streams)
    app.on_cleanup.append(close_reader)
    app.router.add_get("/", page, allow_head=False)
    app.router.add_get(f"{STATUS_PREFIX}static/{{name}}", guarded(asset), allow_head=False)
    app.router.add_get(f"{API}/status", guarded(status), allow_head=False)
    app.router.add_get(f"{API}/upstreams", guarded(upstreams_page), allow_head=False)
    app.router.add_get(f"{API}/sessions", guarded(sessions_page), allow_head=False)
    app.router.add_delete(f"{API}/sessions/{{session}}", guarded(forget))
    app.router.add_get(f"{API}/requests", guarded(requests_page), allow_head=False)
    app.router.add_get(f"{API}/heals", guarded(heals_page), allow_head=False)
    app.router.add_get(EVENTS_PATH, guarded(events), allow_head=False)
