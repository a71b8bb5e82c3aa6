"""Redirects of the upstream URL: only a permanent one (301, 308) moves the upstream for later requests; a
temporary one (302, 307) is followed for its request only, a 303 as a GET without the body; a remembered
target that stops serving is forgotten for the configured URL, and the log says which. With both upstream
clients (the lean pool and aiohttp's)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from tests.conftest import ProxyFactory, echo_call, raw_initialize, session_headers
from tests.fake_upstream import FakeUpstream, not_found

AiohttpServer = Callable[..., Any]


@pytest.fixture(params=["lean", "aiohttp"])
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def call(http: aiohttp.ClientSession, url: str, session_id: str, request_id: int) -> tuple[int, Any]:
    async with http.post(url, data=json.dumps(echo_call(request_id)), headers=session_headers(session_id)) as response:
        return response.status, await response.json()


async def test_a_temporary_redirect_is_followed_for_its_request_only(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory, http: aiohttp.ClientSession, client: str
) -> None:
    upstream = FakeUpstream()
    maintenance = False
    paths: list[str] = []

    async def mcp(request: web.Request) -> web.StreamResponse:
        paths.append(request.path)
        if maintenance:
            raise web.HTTPTemporaryRedirect("/maintenance")
        return await upstream.handle(request)

    async def during_maintenance(request: web.Request) -> web.StreamResponse:
        paths.append(request.path)
        return await upstream.handle(request) if maintenance else not_found()

    app = web.Application()
    app.router.add_route("*", "/mcp", mcp)
    app.router.add_route("*", "/maintenance", during_maintenance)
    server: TestServer = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")), client=client)
    session_id = await raw_initialize(http, proxy.url)
    maintenance = True
    assert await call(http, proxy.url, session_id, 1) == (
        200,
        {"jsonrpc": "2.0", "id": 1, "result": {"echo": echo_call(1)["params"]}},
    )
    assert paths[-2:] == ["/mcp", "/maintenance"]
    maintenance = False
    status, answer = await call(http, proxy.url, session_id, 2)
    assert (status, answer["id"], "result" in answer) == (200, 2, True)
    assert paths[-1] == "/mcp", "the temporary redirect was not remembered"
    assert upstream.initializes == 1, "no heal: the session was never lost"


async def test_a_303_is_fetched_with_a_get_and_the_post_body_is_never_sent_again(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory, http: aiohttp.ClientSession, client: str
) -> None:
    upstream = FakeUpstream()
    seen: list[tuple[str, str, bytes, str | None]] = []

    async def mcp(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append((request.method, request.path, body, request.headers.get("Content-Type")))
        if request.method == "POST" and b'"tools/call"' in body:
            raise web.HTTPSeeOther("/answers/7")
        return await upstream.handle(request)

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append((request.method, request.path, body, request.headers.get("Content-Type")))
        return web.json_response({"jsonrpc": "2.0", "id": 7, "result": {"content": []}})

    app = web.Application()
    app.router.add_route("*", "/mcp", mcp)
    app.router.add_route("*", "/answers/7", answer)
    server: TestServer = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")), client=client)
    session_id = await raw_initialize(http, proxy.url)
    seen.clear()
    status, answered = await call(http, proxy.url, session_id, 7)
    assert (status, answered) == (200, {"jsonrpc": "2.0", "id": 7, "result": {"content": []}})
    assert [(method, path) for method, path, _, _ in seen] == [("POST", "/mcp"), ("GET", "/answers/7")]
    _, _, get_body, get_content_type = seen[1]
    assert (get_body, get_content_type) == (b"", None)
    # The next request goes to the configured URL again.
    seen.clear()
    await raw_initialize(http, proxy.url)
    assert {path for _, path, _, _ in seen} == {"/mcp"}


async def test_a_permanent_redirect_is_remembered_until_its_target_stops_serving(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory, http: aiohttp.ClientSession, client: str
) -> None:
    upstream = FakeUpstream()
    moved = True
    paths: list[str] = []

    # POSTs only: the GET stream the proxy opens at notifications/initialized is not what this is about.
    async def old(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            paths.append(request.path)
        if moved:
            raise web.HTTPPermanentRedirect("/v2/mcp")
        return await upstream.handle(request)

    async def new(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            paths.append(request.path)
        return await upstream.handle(request) if moved else not_found()

    app = web.Application()
    app.router.add_route("*", "/mcp", old)
    app.router.add_route("*", "/v2/mcp", new)
    server: TestServer = await aiohttp_server(app)
    configured = str(server.make_url("/mcp"))
    proxy = await start_proxy(configured, client=client)
    with capture_logs() as logs:
        await raw_initialize(http, proxy.url)
    assert paths == ["/mcp", "/v2/mcp", "/v2/mcp"]
    assert [entry["status"] for entry in logs if entry["event"] == "upstream.redirected"] == [308]
    paths.clear()
    await raw_initialize(http, proxy.url)
    assert set(paths) == {"/v2/mcp"}, "the permanent redirect was remembered"
    moved = False  # the move is undone: the remembered target is gone, the configured URL serves again
    paths.clear()
    with capture_logs() as logs:
        session_id = await raw_initialize(http, proxy.url)
    assert paths == ["/v2/mcp", "/mcp", "/mcp"]
    (forgotten,) = [entry for entry in logs if entry["event"] == "upstream.redirect_forgotten"]
    assert (forgotten["remembered"], forgotten["configured"]) == (str(server.make_url("/v2/mcp")), configured)
    assert forgotten["reason"] == "it answered 404"
    status, answer = await call(http, proxy.url, session_id, 3)
    assert (status, answer["id"]) == (200, 3)
