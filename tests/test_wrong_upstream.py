"""An upstream URL that is not an MCP endpoint (a missing /mcp, a typo): the client's requests get a
JSON-RPC error with their id that names the URL and what it answered, and the log says the same."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web
from structlog.testing import capture_logs

from tests.conftest import (
    INITIALIZE_PARAMS,
    MCP_HEADERS,
    ProxyFactory,
    UpstreamProcess,
    echo_call,
    raw_initialize,
    session_headers,
)
from tests.fake_upstream import FakeUpstream

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}


async def test_an_upstream_url_without_the_mcp_path_gets_an_error_naming_the_url_and_its_answer(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    wrong = sse_upstream.url.removesuffix("/mcp")  # the SDK server answers 404 text/plain there
    proxy = await start_proxy(wrong)
    with capture_logs() as logs:
        async with http.post(proxy.url, json=INITIALIZE, headers=MCP_HEADERS) as response:
            assert response.status == 502
            answer = json.loads(await response.read())
    assert answer["id"] == 1
    message = answer["error"]["message"]
    assert wrong in message
    assert "404" in message
    assert "/mcp" in message
    assert any(entry["event"] == "upstream.not_mcp" and entry["log_level"] == "warning" for entry in logs)


async def test_a_gateway_error_page_to_a_call_becomes_an_error_with_its_id(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)

    async def gateway_page(request: web.Request, body: object) -> web.StreamResponse | None:
        return web.Response(status=503, text="<html>upstream down</html>", content_type="text/html")

    upstream.on_request = gateway_page
    async with http.post(proxy.url, json=echo_call(9), headers=session_headers(session_id)) as response:
        answer = json.loads(await response.read())
    assert answer["id"] == 9
    assert "503" in answer["error"]["message"]


async def test_a_json_rpc_error_the_upstream_sends_with_a_failure_status_passes_through(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    session_id = await raw_initialize(http, proxy.url)
    refusal = {"jsonrpc": "2.0", "id": 10, "error": {"code": -32602, "message": "bad params"}}

    async def refuse(request: web.Request, body: object) -> web.StreamResponse | None:
        return web.json_response(refusal, status=400)

    upstream.on_request = refuse
    async with http.post(proxy.url, json=echo_call(10), headers=session_headers(session_id)) as response:
        assert response.status == 400
        assert json.loads(await response.read()) == refusal
