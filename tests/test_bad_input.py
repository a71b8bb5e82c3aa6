"""Bad input gets a clear status and a JSON-RPC error body, and the proxy keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import MCP_HEADERS, ProxyFactory, RunningProxy, raw_initialize, session_headers
from tests.fake_upstream import FakeUpstream

AiohttpServer = Callable[..., Any]


@pytest.fixture
async def proxy(aiohttp_server: AiohttpServer, start_proxy: ProxyFactory) -> tuple[RunningProxy, FakeUpstream]:
    upstream = FakeUpstream()
    server: TestServer = await aiohttp_server(upstream.app())
    running = await start_proxy(str(server.make_url("/mcp")), max_body_bytes=1024)
    return running, upstream


async def still_serves(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    session_id = await raw_initialize(http, proxy.url)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}
    async with http.post(proxy.url, json=body, headers=session_headers(session_id)) as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, -32700),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":"\xff"}', "application/json", 400, -32700),
        (b"[" * 50_000 + b"]" * 50_000, "application/json", 413, -32600),
        (b"[" * 500 + b"]" * 500, "application/json", 400, -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":"x"}', "text/plain", 415, -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":"x"}' + b" " * 2000, "application/json", 413, -32600),
        (b'{"jsonrpc":"2.0","id":[1],"method":"x"}', "application/json", 400, -32600),
        (b"[]", "application/json", 400, -32600),
    ],
    ids=["malformed", "bad-utf8", "deep-over-limit", "deep", "content-type", "too-large", "bad-id", "empty-batch"],
)
async def test_bad_post_bodies_get_jsonrpc_errors(
    proxy: tuple[RunningProxy, FakeUpstream],
    http: aiohttp.ClientSession,
    body: bytes,
    content_type: str,
    status: int,
    code: int,
) -> None:
    running, upstream = proxy
    headers = {**MCP_HEADERS, "Content-Type": content_type}
    async with http.post(running.url, data=body, headers=headers) as response:
        assert response.status == status
        answer = await response.json()
        assert answer["error"]["code"] == code
    assert upstream.seen == []
    await still_serves(http, running)


async def test_deeply_nested_json_within_the_limit_is_refused_cleanly(
    aiohttp_server: AiohttpServer, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream = FakeUpstream()
    server: TestServer = await aiohttp_server(upstream.app())
    running = await start_proxy(str(server.make_url("/mcp")))  # default 4 MiB limit
    async with http.post(running.url, data=b"[" * 100_000 + b"]" * 100_000, headers=MCP_HEADERS) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == -32700
    await still_serves(http, running)


async def test_a_body_over_the_limit_is_refused_without_reading_it_all(
    proxy: tuple[RunningProxy, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    running, _ = proxy
    parts = urlsplit(running.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    # Announce 10 MB, send only the headers: the proxy must answer from Content-Length alone.
    writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(5):
        status_line = await reader.readline()
    assert b" 413 " in status_line
    writer.close()
    await still_serves(http, running)


async def test_a_truncated_body_does_not_reach_the_upstream(
    proxy: tuple[RunningProxy, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    running, upstream = proxy
    parts = urlsplit(running.url)
    _reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        b'POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"jsonrpc"'
    )
    await writer.drain()
    writer.close()  # the client goes away mid-body
    await writer.wait_closed()
    await still_serves(http, running)
    posts = [seen for seen in upstream.seen if seen.method == "POST"]
    assert all(seen.body is not None for seen in posts)
    assert len(posts) == 3  # only still_serves' initialize, initialized and call


@pytest.mark.parametrize("session_id", ["has space", "x" * 200, "tab\there"])
async def test_malformed_session_ids_are_refused(
    proxy: tuple[RunningProxy, FakeUpstream], http: aiohttp.ClientSession, session_id: str
) -> None:
    running, upstream = proxy
    body = {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}
    async with http.post(running.url, json=body, headers={**MCP_HEADERS, "Mcp-Session-Id": session_id}) as response:
        assert response.status == 400
        answer = await response.json()
        assert answer["id"] == 4
        assert "Mcp-Session-Id" in answer["error"]["message"]
    assert upstream.seen == []


async def test_a_session_id_with_crlf_cannot_inject_headers(
    proxy: tuple[RunningProxy, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    running, upstream = proxy
    parts = urlsplit(running.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
    writer.write(
        b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nMcp-Session-Id: abc\rX-Injected: 1\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    async with asyncio.timeout(5):
        status_line = await reader.readline()
    writer.close()
    assert b" 400 " in status_line
    assert all("X-Injected" not in seen.headers for seen in upstream.seen)
    await still_serves(http, running)


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
async def test_unsupported_methods_get_405_with_a_jsonrpc_body(
    proxy: tuple[RunningProxy, FakeUpstream], http: aiohttp.ClientSession, method: str
) -> None:
    running, _ = proxy
    async with http.request(method, running.url, data=b"{}") as response:
        assert response.status == 405
        assert "POST" in response.headers["Allow"]
        assert (await response.json())["error"]["code"] == -32600


async def test_unknown_paths_get_404_quickly_with_a_jsonrpc_body(
    proxy: tuple[RunningProxy, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    running, _ = proxy
    url = running.url.replace("/mcp", "/.well-known/oauth-authorization-server/mcp")
    async with http.get(url) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == -32601


async def test_oversized_headers_are_refused_and_the_proxy_keeps_serving(
    proxy: tuple[RunningProxy, FakeUpstream], http: aiohttp.ClientSession
) -> None:
    running, upstream = proxy
    async with http.post(running.url, data=b"{}", headers={**MCP_HEADERS, "X-Big": "a" * 20_000}) as response:
        assert response.status in (400, 431)
    assert upstream.seen == []
    await still_serves(http, running)
