"""Nobody let in: Origin validation, the inbound token, loopback by default."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from mcp_heal_proxy.front.guards import origin_is_allowed
from tests.conftest import MCP_HEADERS, ProxyFactory, RunningProxy, raw_initialize, session_headers
from tests.fake_upstream import FakeUpstream

AiohttpServer = Callable[..., Any]
TOKEN = "inbound-token-5c1d2e"
MCP_RAW_HEADERS = "".join(f"{name}: {value}\r\n" for name, value in MCP_HEADERS.items()).encode()


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("https://127.0.0.1", True),
        ("http://[::1]:8080", True),
        ("https://app.example.com", True),
        ("http://evil.example", False),
        ("http://localhost.evil.example", False),
        ("null", False),
        ("file://", False),
    ],
)
def test_origin_rules(origin: str, allowed: bool) -> None:
    assert origin_is_allowed(origin, frozenset({"https://app.example.com"})) is allowed


async def test_a_foreign_origin_gets_403(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await start_proxy(url)
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    async with http.post(proxy.url, json=body, headers={**MCP_HEADERS, "Origin": "http://evil.example"}) as response:
        assert response.status == 403
        assert (await response.json())["error"]["message"] == "Origin not allowed"
    assert upstream.seen == []
    async with http.post(proxy.url, json=body, headers={**MCP_HEADERS, "Origin": "http://localhost:5173"}) as response:
        assert response.status == 200
    assert "Origin" not in upstream.seen[-1].headers


async def with_token(start_proxy: ProxyFactory, url: str) -> RunningProxy:
    return await start_proxy(url, token=TOKEN)


async def test_the_inbound_token_is_required_and_not_forwarded(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = fake
    proxy = await with_token(start_proxy, url)
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    for presented in (None, "Bearer wrong", f"Bearer {TOKEN}x", TOKEN):
        headers = dict(MCP_HEADERS) if presented is None else {**MCP_HEADERS, "Authorization": presented}
        async with http.post(proxy.url, json=body, headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert TOKEN not in await response.text()
    assert upstream.seen == []
    authorized = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
    async with authorized:
        session_id = await raw_initialize(authorized, proxy.url)
        async with authorized.post(
            proxy.url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=session_headers(session_id)
        ) as response:
            assert response.status == 200
        async with authorized.get(proxy.url.replace("/mcp", "/metrics")) as response:
            assert response.status == 200
    assert all("Authorization" not in seen.headers for seen in upstream.seen)
    async with http.get(proxy.url.replace("/mcp", "/healthz")) as response:
        assert response.status == 200
    async with http.get(proxy.url.replace("/mcp", "/metrics")) as response:
        assert response.status == 401


async def test_the_checks_run_in_order_origin_then_token_then_route(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A refused request learns nothing about which paths and methods exist; an authorized one gets
    JSON-RPC errors for unknown paths and methods."""
    _, url = fake
    proxy = await with_token(start_proxy, url)
    base = proxy.url.removesuffix("/mcp")
    token = {"Authorization": f"Bearer {TOKEN}"}
    foreign = {"Origin": "http://evil.example"}
    cases: list[tuple[str, str, dict[str, str], int]] = [
        ("PUT", "/nowhere", foreign, 403),
        ("PUT", "/nowhere", {**foreign, **token}, 403),
        ("PUT", "/nowhere", {}, 401),
        ("PUT", "/mcp", {}, 401),
        ("PUT", "/nowhere", token, 404),
        ("PUT", "/mcp", token, 405),
    ]
    for method, path, headers, status in cases:
        async with http.request(method, base + path, headers=headers) as response:
            assert response.status == status, (method, path, headers)
            body = await response.json()
        assert "error" in body, body
        assert body["id"] is None
        if status == 405:
            assert response.headers["Allow"] == "DELETE, GET, OPTIONS, POST"


async def raw_status(url: str, method: str, target: str, headers: bytes) -> int:
    """The status code of one request written byte for byte (aiohttp's client would refuse or encode
    the bytes these checks need: a header that is not UTF-8)."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: 0\r\nConnection: close\r\n"
        writer.write(head.encode() + headers + b"\r\n")
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            await reader.read()
    finally:
        writer.close()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    "credential",
    [
        b"Authorization: Bearer \xc3\xa9\xc3\xa9\xc3\xa9\r\n",  # UTF-8, not ASCII
        b"Authorization: Bearer \xff\xfe\r\n",  # not even UTF-8
        b"Cookie: mcp_heal_proxy_status=\xc3\xa9\r\n",
        b"Cookie: mcp_heal_proxy_status=\xff\r\n",
    ],
)
async def test_a_non_ascii_credential_is_refused_not_an_error(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, credential: bytes
) -> None:
    """A credential that is not ASCII never matches the token, and is refused like any wrong one (401):
    the constant-time comparisons take bytes, so such a header is no 500."""
    upstream, url = fake
    proxy = await with_token(start_proxy, url)
    assert await raw_status(proxy.url, "POST", "/mcp", MCP_RAW_HEADERS + credential) == 401
    for target in ("/_proxy/api/upstreams", "/?token=%C3%A9", "/?token=%FF"):
        assert await raw_status(proxy.url, "GET", target, credential) in (302, 401, 403), target
    assert upstream.seen == []
