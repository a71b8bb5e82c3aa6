"""CORS for browser-based clients: allowed Origins get preflights and readable answers, others 403."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import MCP_HEADERS, ProxyFactory, UpstreamProcess, raw_initialize, session_headers
from tests.fake_upstream import FakeUpstream

APP_ORIGIN = "https://app.example.com"
TOKEN = "cors-inbound-token-81f2"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "browser", "version": "1"}},
}


def preflight_headers(origin: str, method: str = "POST", requested: str | None = None) -> dict[str, str]:
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if requested is not None:
        headers["Access-Control-Request-Headers"] = requested
    return headers


def listed(value: str) -> list[str]:
    return [item.strip().lower() for item in value.split(",")]


async def test_a_preflight_from_a_localhost_origin_gets_204_with_what_a_browser_needs(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    requested = "content-type, mcp-session-id, mcp-protocol-version, x-trace-id, cookie, sec-fetch-mode"
    origin = "http://localhost:5173"
    async with http.options(proxy.url, headers=preflight_headers(origin, "POST", requested)) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert listed(response.headers["Access-Control-Allow-Methods"]) == ["get", "post", "delete", "options"]
        allowed = listed(response.headers["Access-Control-Allow-Headers"])
        for name in ("content-type", "accept", "authorization", "mcp-session-id", "mcp-protocol-version"):
            assert name in allowed
        assert "last-event-id" in allowed
        assert "x-trace-id" in allowed, "a requested header the proxy forwards anyway is allowed"
        assert "cookie" not in allowed
        assert "sec-fetch-mode" not in allowed
        assert int(response.headers["Access-Control-Max-Age"]) > 0
        assert "origin" in listed(response.headers["Vary"])
    assert upstream.seen == [], "a preflight is answered by the proxy, never sent upstream"


async def test_a_preflight_from_a_configured_origin_needs_no_token_and_gets_private_network_access(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    _, url = fake
    proxy = await start_proxy(url, allowed_origins=(APP_ORIGIN,), token=TOKEN)
    headers = {
        **preflight_headers(APP_ORIGIN, "GET", "authorization"),
        "Access-Control-Request-Private-Network": "true",
    }
    async with http.options(proxy.url, headers=headers) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        assert response.headers["Access-Control-Allow-Private-Network"] == "true"
    # The token still guards everything that reaches an upstream.
    async with http.post(proxy.url, json=INITIALIZE, headers={**MCP_HEADERS, "Origin": APP_ORIGIN}) as response:
        assert response.status == 401
        # ...and the browser client may read why.
        assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        assert "www-authenticate" in listed(response.headers["Access-Control-Expose-Headers"])


async def test_a_foreign_origin_still_gets_403_on_preflights_and_requests(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url, allowed_origins=(APP_ORIGIN,))
    for origin in ("http://evil.example", "https://app.example.com.evil.example", "null"):
        async with http.options(proxy.url, headers=preflight_headers(origin)) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
        async with http.post(proxy.url, json=INITIALIZE, headers={**MCP_HEADERS, "Origin": origin}) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
    assert upstream.seen == []


async def test_answers_to_an_allowed_origin_expose_the_session_id_and_carry_only_the_proxys_policy(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake

    async def permissive_upstream(request: web.Request, body: Any) -> web.StreamResponse | None:
        # An upstream with a CORS policy of its own: beside the proxy's, the browser would refuse both.
        return web.json_response(
            {"jsonrpc": "2.0", "id": body["id"], "result": {}},
            headers={"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"},
        )

    upstream.on_request = permissive_upstream
    proxy = await start_proxy(url, allowed_origins=(APP_ORIGIN,))
    browser = {"Origin": APP_ORIGIN}
    async with http.post(proxy.url, json=INITIALIZE, headers={**MCP_HEADERS, **browser}) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        exposed = listed(response.headers["Access-Control-Expose-Headers"])
        assert {"mcp-session-id", "mcp-protocol-version", "www-authenticate"} <= set(exposed)
        session_id = response.headers["Mcp-Session-Id"]
    body = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    async with http.post(proxy.url, json=body, headers={**session_headers(session_id), **browser}) as response:
        assert response.status == 200
        assert response.headers.getall("Access-Control-Allow-Origin") == [APP_ORIGIN]
        assert "Access-Control-Allow-Credentials" not in response.headers


async def test_a_streamed_answer_from_the_sdk_server_is_readable_by_an_allowed_origin(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    session_id = await raw_initialize(http, proxy.url)
    origin = "http://127.0.0.1:3000"
    body = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    async with http.post(proxy.url, json=body, headers={**session_headers(session_id), "Origin": origin}) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert b"tools" in await response.read()


async def test_clients_without_an_origin_get_no_cors_headers(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    _, url = fake
    proxy = await start_proxy(url)
    async with http.post(proxy.url, json=INITIALIZE, headers=MCP_HEADERS) as response:
        assert response.status == 200
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]
