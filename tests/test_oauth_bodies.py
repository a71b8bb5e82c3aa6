"""OAuth bodies arrive in pieces on real networks: every one the proxy reads is read whole, and bounded.

A fake upstream (its own authorization server) sends every answer in two TCP writes with a pause
between them, and the client sends its registration and token requests to the stand-in the same way.
Loopback delivers a small body in one piece, which hid that the proxy read only what was buffered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from mcp_heal_proxy.auth import endpoints, errors
from mcp_heal_proxy.auth.bodies import OAUTH_BODY_LIMIT
from tests.conftest import ProxyFactory

PAUSE = 0.2
REDIRECT_URI = "http://127.0.0.1:9/callback"


async def answer_in_two_writes(request: web.Request, document: Any, status: int = 200) -> web.StreamResponse:
    """``document`` as JSON, its bytes in two writes with a pause between."""
    body = json.dumps(document).encode()
    response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    await asyncio.sleep(PAUSE)
    await response.write(body[len(body) // 2 :])
    await response.write_eof()
    return response


class SplittingUpstream:
    """Protected-resource and authorization-server metadata, registration, token and revocation
    endpoints, each answering in two writes; what each endpoint received is kept."""

    def __init__(self) -> None:
        self.received: dict[str, bytes] = {}
        self.app = web.Application()
        self.app.router.add_get("/.well-known/oauth-protected-resource/mcp", self.protected_resource)
        self.app.router.add_get("/.well-known/oauth-authorization-server", self.authorization_server)
        self.app.router.add_post("/register", self.register)
        self.app.router.add_post("/token", self.token)
        self.app.router.add_post("/revoke", self.revoke)

    @staticmethod
    def origin(request: web.Request) -> str:
        return f"http://{request.host}"

    async def protected_resource(self, request: web.Request) -> web.StreamResponse:
        origin = self.origin(request)
        # Padding makes the document a few kilobytes, as real ones with many scopes are.
        document = {"resource": origin + "/mcp", "authorization_servers": [origin], "scopes_supported": ["mcp"]}
        return await answer_in_two_writes(request, {**document, "resource_name": "x" * 4000})

    async def authorization_server(self, request: web.Request) -> web.StreamResponse:
        origin = self.origin(request)
        document = {
            "issuer": origin,
            "authorization_endpoint": origin + "/authorize",
            "token_endpoint": origin + "/token",
            "registration_endpoint": origin + "/register",
            "revocation_endpoint": origin + "/revoke",
            "code_challenge_methods_supported": ["S256"],
            "service_documentation": origin + "/" + "d" * 4000,
        }
        return await answer_in_two_writes(request, document)

    async def register(self, request: web.Request) -> web.StreamResponse:
        self.received["register"] = await request.read()
        asked = json.loads(self.received["register"])
        answer = {**asked, "client_id": "client-1", "client_id_issued_at": 1, "padding": "p" * 4000}
        return await answer_in_two_writes(request, answer, status=201)

    async def token(self, request: web.Request) -> web.StreamResponse:
        self.received["token"] = await request.read()
        answer = {"access_token": "a" * 2000, "token_type": "Bearer", "expires_in": 3600, "refresh_token": "r" * 2000}
        return await answer_in_two_writes(request, answer)

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        self.received["revoke"] = await request.read()
        return await answer_in_two_writes(request, {})


async def request_in_two_writes(url: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """A POST whose body goes out in two writes with a pause between; the status and the whole answer body."""
    parts = URL(url)
    assert parts.port is not None
    reader, writer = await asyncio.open_connection(parts.host, parts.port)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.host}:{parts.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(PAUSE)
        writer.write(body[len(body) // 2 :])
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    head_bytes, _, answer = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert "chunked" not in headers.get("transfer-encoding", ""), "the test reads Content-Length bodies only"
    assert len(answer) == int(headers["content-length"])
    return int(lines[0].split()[1]), answer


async def warm(proxy_url: str) -> None:
    """Have the proxy fetch and cache the upstream's metadata, so that a request's body is read at once
    (else the metadata fetches give its second half time to arrive)."""
    metadata = proxy_url.replace("/mcp", "/.well-known/oauth-authorization-server/mcp")
    async with aiohttp.ClientSession() as http, http.get(metadata) as response:
        assert response.status == 200


@pytest.fixture
async def splitting(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[SplittingUpstream, str]:
    upstream = SplittingUpstream()
    server = await aiohttp_server(upstream.app)
    return upstream, str(server.make_url("/mcp"))


async def test_metadata_sent_in_two_writes_is_served_whole(
    splitting: tuple[SplittingUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    _, url = splitting
    proxy = await start_proxy(url)
    origin = proxy.url.removesuffix("/mcp")
    async with http.get(origin + "/.well-known/oauth-protected-resource/mcp") as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["resource"] == proxy.url
    async with http.get(origin + "/.well-known/oauth-authorization-server/mcp") as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["registration_endpoint"] == origin + "/oauth/mcp/register"


@pytest.mark.parametrize("http_server", ["fast", "aiohttp"])
async def test_registration_in_pieces_both_ways_reaches_each_side_whole(
    splitting: tuple[SplittingUpstream, str], start_proxy: ProxyFactory, http_server: str
) -> None:
    upstream, url = splitting
    proxy = await start_proxy(url, http_server=http_server)
    await warm(proxy.url)
    registration = {"redirect_uris": [REDIRECT_URI], "client_name": "c" * 3000, "token_endpoint_auth_method": "none"}
    sent = json.dumps(registration).encode()
    status, answer = await request_in_two_writes(proxy.url, "/oauth/mcp/register", sent, "application/json")
    assert status == 201, answer
    assert json.loads(upstream.received["register"]) == registration
    registered = json.loads(answer)
    assert registered["client_id"] == "client-1"
    assert registered["padding"] == "p" * 4000


@pytest.mark.parametrize("http_server", ["fast", "aiohttp"])
@pytest.mark.parametrize("endpoint", ["token", "revoke"])
async def test_token_and_revocation_requests_in_pieces_both_ways_reach_each_side_whole(
    splitting: tuple[SplittingUpstream, str], start_proxy: ProxyFactory, endpoint: str, http_server: str
) -> None:
    upstream, url = splitting
    proxy = await start_proxy(url, http_server=http_server)
    await warm(proxy.url)
    body = "&".join(f"{k}={v}" for k, v in (("grant_type", "refresh_token"), ("refresh_token", "t" * 3000)))
    content_type = "application/x-www-form-urlencoded"
    status, answer = await request_in_two_writes(proxy.url, f"/oauth/mcp/{endpoint}", body.encode(), content_type)
    assert status == 200, answer
    received = dict(pair.split("=", 1) for pair in upstream.received[endpoint].decode().split("&"))
    assert received["refresh_token"] == "t" * 3000
    if endpoint == "token":
        assert json.loads(answer)["refresh_token"] == "r" * 2000


async def test_managed_login_reads_answers_whole_and_bounded(
    splitting: tuple[SplittingUpstream, str], aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    _, url = splitting
    origin = url.removesuffix("/mcp")
    async with aiohttp.ClientSession() as http:
        answer = await endpoints.token_request(http, origin + "/token", {}, "client-1", None, "none")
        assert answer["refresh_token"] == "r" * 2000

        async def huge(request: web.Request) -> web.StreamResponse:
            document = {"access_token": "a", "token_type": "Bearer", "padding": "x" * OAUTH_BODY_LIMIT}
            return await answer_in_two_writes(request, document)

        app = web.Application()
        app.router.add_post("/token", huge)
        app.router.add_get("/metadata", huge)
        server = await aiohttp_server(app)
        with pytest.raises(errors.TokenRefused):
            await endpoints.token_request(http, str(server.make_url("/token")), {}, "client-1", None, "none")
        assert await endpoints.get_json(http, str(server.make_url("/metadata"))) is None
