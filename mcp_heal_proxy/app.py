"""Builds the aiohttp application: routes, and the resources that live as long as the app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from mcp_heal_proxy.config import ENDPOINT_PATH, MEMORY_STATE, ProxyConfig
from mcp_heal_proxy.healing import Healer
from mcp_heal_proxy.proxy import Proxy
from mcp_heal_proxy.sessions import MemorySessionStore, SessionStore
from mcp_heal_proxy.upstream import Upstream

PROXY_KEY = web.AppKey("proxy", Proxy)
STORE_KEY = web.AppKey("store", SessionStore)


def open_store(state: str) -> SessionStore:
    """The session store named by ``--state``."""
    if state == MEMORY_STATE:
        return MemorySessionStore()
    # The durable store is not built yet; run on memory rather than refuse the documented flag.
    return MemorySessionStore()


def build_app(config: ProxyConfig) -> web.Application:
    """The proxy as an aiohttp application."""
    app = web.Application(client_max_size=config.max_body_bytes)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=config.upstream.pool_size, limit_per_host=config.upstream.pool_size)
        # One client for the app's lifetime: pooled keep-alive connections to the upstream.
        async with aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        ) as client:
            store = open_store(config.state)
            healer = Healer(Upstream(config.upstream, client), store)
            app[STORE_KEY] = store
            app[PROXY_KEY] = Proxy(Upstream(config.upstream, client), store, healer, config.max_body_bytes)
            try:
                yield
            finally:
                await healer.close()
                await store.close()

    app.cleanup_ctx.append(lifetime)

    async def post(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY_KEY].handle_post(request)

    async def get(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY_KEY].handle_get(request)

    async def delete(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY_KEY].handle_delete(request)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_post(ENDPOINT_PATH, post)
    app.router.add_get(ENDPOINT_PATH, get, allow_head=False)
    app.router.add_delete(ENDPOINT_PATH, delete)
    app.router.add_get("/healthz", healthz)
    return app
