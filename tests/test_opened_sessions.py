"""Every path that refuses an upstream session the proxy opened ends it (a DELETE), rather than leave it
to the upstream's idle timeout: an initialize answered with garbage, a heal that fails or times out after
the new session opened."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import MCP_HEADERS, ProxyFactory, wait_until

AiohttpServer = Callable[..., Any]


async def test_an_initialize_answered_with_an_html_page_ends_the_session_it_opened(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    deleted: list[str | None] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            deleted.append(request.headers.get("Mcp-Session-Id"))
            return web.Response(status=200)
        # A captive portal or a misrouted balancer: 200, a session id, and a page.
        return web.Response(
            status=200, text="<html>sign in</html>", content_type="text/html", headers={"Mcp-Session-Id": "html-1"}
        )

    app = web.Application()
    app.router.add_route("*", "/mcp", handle)
    server: TestServer = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")))
    body = {"jsonrpc": "2.0", "id": 7, "method": "initialize", "params": {}}
    async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 502
        answer = await response.json()
        assert "Mcp-Session-Id" not in response.headers
    assert answer["id"] == 7
    assert "text/html" in answer["error"]["message"]

    async def ended() -> bool:
        return deleted == ["html-1"]

    await wait_until(ended, 5, "the upstream session the refused initialize opened was ended")
