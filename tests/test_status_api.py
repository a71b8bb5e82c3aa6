"""The status page's JSON endpoints and event feed: what they show, who may see them, and that nothing
secret (tokens, injected header values, bodies, full session ids) ever reaches them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from mcp_heal_proxy.config import ConfigError, build_config, single_upstream
from mcp_heal_proxy.front.app import STORE_KEY, build_app
from mcp_heal_proxy.status import COOKIE, Access, upstream_display
from tests.conftest import (
    TEST_CLIENT,
    ProxyFactory,
    UpstreamProcess,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream

TOKEN = "inbound-token-7f3e9a41c2"
INJECTED = "injected-secret-b81d6c0e"
CLIENT_SECRET = "client-header-secret-55aa01"
QUERY_SECRET = "query-key-9e2b7d"
BODY_SECRET = "tool-argument-secret-31f0"
ERROR_SECRET = "upstream-error-body-secret-c4d2"
ENDPOINTS = (
    "/",
    "/_proxy/api/status",
    "/_proxy/api/upstreams",
    "/_proxy/api/sessions",
    "/_proxy/api/requests",
    "/_proxy/api/heals",
    "/_proxy/static/status.js",
    "/_proxy/static/status.css",
)


def call(request_id: int, text: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}},
    }


async def read_feed(http: aiohttp.ClientSession, url: str, until: bytes, count: int, into: list[bytes]) -> None:
    """Read the event feed until ``until`` appeared ``count`` times."""
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        async for chunk in response.content.iter_any():
            into.append(chunk)
            if b"".join(into).count(until) >= count:
                return


async def test_json_endpoints_show_sessions_requests_heals_and_health(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url, connect_retry=10.0)
    base = proxy.url.removesuffix("/mcp")
    session_id = await raw_initialize(http, proxy.url)
    async with http.post(proxy.url, json=call(2, "hi"), headers=session_headers(session_id)) as response:
        assert response.status == 200
        await response.read()
    await sse_upstream.restart()
    async with http.post(proxy.url, json=call(3, "again"), headers=session_headers(session_id)) as response:
        assert response.status == 200
        await response.read()

    async with http.get(f"{base}/_proxy/api/status") as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        status = await response.json()
    (session,) = status["sessions"]["shown"]
    assert session["id"] == session_id[:8]
    assert (session["client"], session["client_version"]) == ("raw-test-client", "1")
    assert session["protocol_version"] == "2025-11-25"
    assert session["heals"] == 1
    assert status["sessions"]["count"] == 1
    (heal,) = status["heals"]
    assert (heal["session"], heal["reason"], heal["outcome"], heal["generation"]) == (
        session_id[:8],
        "http_404",
        "healed",
        1,
    )
    calls = [r for r in status["requests"] if r["method"] == "tools/call"]
    assert [(r["tool"], r["healed"], r["status"]) for r in calls] == [("echo", True, 200), ("echo", False, 200)]
    (upstream,) = status["upstreams"]
    assert upstream["name"] == "default"
    assert upstream["path"] == "/mcp"
    assert upstream["heals"] == {"healed": 1, "failed": 0}
    assert upstream["last_success"] is not None
    assert upstream["last_failure"] is None
    assert upstream["latency"]["window"] >= 3
    assert upstream["latency"]["p50_ms"] > 0
    assert status["seq"] == max(r["seq"] for r in status["requests"] + status["heals"])
    async with http.get(f"{base}/_proxy/api/requests?limit=1") as response:
        assert len((await response.json())["requests"]) == 1


async def test_nothing_secret_reaches_the_page_its_json_or_its_feed(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory
) -> None:
    upstream, url = fake
    proxy = await start_proxy(f"{url}?api_key={QUERY_SECRET}", token=TOKEN, headers={"X-Api-Key": INJECTED})
    base = proxy.url.removesuffix("/mcp")
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Custom": CLIENT_SECRET, "Cookie": f"sid={CLIENT_SECRET}"}
    feed: list[bytes] = []
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(read_feed(http, f"{base}/_proxy/api/events", b"event: heal", 2, feed))
            await wait_until(lambda: b"event: hello" in b"".join(feed), 10, "feed open")
            session_id = await raw_initialize(http, proxy.url)
            async with http.post(proxy.url, json=call(2, BODY_SECRET), headers=session_headers(session_id)) as r:
                assert r.status == 200
            upstream.forget_all()
            async with http.post(proxy.url, json=call(3, BODY_SECRET), headers=session_headers(session_id)) as r:
                assert r.status == 200, "healed"

            async def broken(request: web.Request, body: Any) -> web.Response:
                return web.Response(status=500, text=f"{ERROR_SECRET} {request.headers.get('X-Api-Key')}")

            upstream.on_reinitialize = broken
            upstream.forget_all()
            async with http.post(proxy.url, json=call(4, BODY_SECRET), headers=session_headers(session_id)) as r:
                assert (await r.json())["error"], "the heal failed"
            async with asyncio.timeout(10):
                await reader
        pages = []
        for path in ENDPOINTS:
            async with http.get(f"{base}{path}") as response:
                assert response.status == 200, path
                pages.append(await response.text())
    assert any(seen.headers.get("X-Custom") == CLIENT_SECRET for seen in upstream.seen), "the header went upstream"
    status_text = pages[1]
    assert "heal failed: upstream answered 500 to the re-initialize" in status_text
    assert '"tool":"echo"' in status_text
    everything = "\n".join(pages) + b"".join(feed).decode()
    upstream_ids = {seen.headers["Mcp-Session-Id"] for seen in upstream.seen if "Mcp-Session-Id" in seen.headers}
    assert upstream_ids, "the upstream issued session ids"
    for secret in (TOKEN, INJECTED, CLIENT_SECRET, QUERY_SECRET, BODY_SECRET, ERROR_SECRET, session_id, *upstream_ids):
        assert secret not in everything, secret


async def test_without_a_token_only_local_host_names_get_the_page(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    _, url = fake
    proxy = await start_proxy(url)
    base = proxy.url.removesuffix("/mcp")
    port = base.rsplit(":", 1)[1]
    for host, expected in ((f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200), (f"rebound.example:{port}", 403)):
        for path in ("/", "/_proxy/api/status", "/_proxy/api/events"):
            async with http.get(f"{base}{path}", headers={"Host": host}) as response:
                assert response.status == expected, (host, path)


def test_clients_off_the_machine_are_refused_without_a_token() -> None:
    access = Access(single_upstream("http://127.0.0.1:9/mcp"))
    for remote, refused in (("127.0.0.1", False), ("::1", False), ("::ffff:127.0.0.1", False), ("10.1.2.3", True)):
        transport = mock.Mock()
        transport.get_extra_info.return_value = (remote, 40000)
        request = make_mocked_request(
            "GET", "/_proxy/api/status", headers={"Host": "127.0.0.1:8787"}, transport=transport
        )
        answer = access.refusal(request)
        assert (answer is not None and answer.status == 403) is refused, remote


async def test_with_a_token_the_page_takes_it_once_in_the_url_then_a_cookie(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory
) -> None:
    _, url = fake
    proxy = await start_proxy(url, token=TOKEN)
    base = proxy.url.removesuffix("/mcp")
    # unsafe: the jar keeps cookies of IP-address hosts (127.0.0.1), as browsers do.
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=15)) as browser:
        for path in ("/", "/_proxy/api/status", "/_proxy/static/status.js"):
            async with browser.get(f"{base}{path}") as response:
                assert response.status == 401, path
        async with browser.get(f"{base}/?token=wrong") as response:
            assert response.status == 401
        async with browser.get(f"{base}/?token={TOKEN}", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/"
            cookie = response.cookies[COOKIE]
            assert cookie["httponly"]
            assert cookie["samesite"] == "Strict"
            assert TOKEN not in cookie.value
        async with browser.get(f"{base}/_proxy/api/status") as response:
            assert response.status == 200, "the cookie opens the status endpoints"
        async with browser.get(f"{base}/") as response:
            assert response.status == 200
            assert "<title>mcp-heal-proxy status</title>" in await response.text()
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        async with browser.post(proxy.url, json=body) as response:
            assert response.status == 401, "the cookie is no key to the MCP endpoint"
        async with browser.get(f"{base}/metrics") as response:
            assert response.status == 401
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as bearer,
        bearer.get(f"{base}/_proxy/api/status", headers={"Host": f"elsewhere.example:{base.rsplit(':', 1)[1]}"}) as r,
    ):
        assert r.status == 200, "with a token, any host name that brings it is served"


async def test_forget_ends_the_session_upstream_and_forgets_it(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    base = proxy.url.removesuffix("/mcp")
    session_id = await raw_initialize(http, proxy.url)
    assert len(await sse_upstream.live_sessions()) == 1
    async with http.delete(f"{base}/_proxy/api/sessions/{session_id}") as response:
        assert response.status == 200
        answer = await response.json()
    assert answer == {
        "session": session_id[:8],
        "upstream": "default",
        "record_deleted": True,
        "upstream_ended": True,
        "upstream_status": 200,
        "upstream_error": None,
    }
    assert await sse_upstream.live_sessions() == []
    assert await proxy.record(session_id) is None
    async with http.delete(f"{base}/_proxy/api/sessions/{session_id}") as response:
        assert response.status == 404


async def test_open_event_streams_end_at_shutdown_without_holding_it(fake: tuple[FakeUpstream, str]) -> None:
    _, url = fake
    config = single_upstream(url, client=TEST_CLIENT, shutdown_grace=30.0)
    server = TestServer(build_app(config), host="127.0.0.1", port=0)
    await server.start_server()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        response = await http.get(server.make_url("/_proxy/api/events"))
        assert response.status == 200
        assert b"event: hello" in await response.content.readuntil(b"\n\n")
        started = time.monotonic()
        async with asyncio.timeout(10):
            await server.close()
        assert time.monotonic() - started < 5
        assert await response.content.read() == b"", "the stream ended"
        response.release()
    assert STORE_KEY not in server.app or server.app[STORE_KEY] is not None


@pytest.mark.parametrize("path", ["/", "/_proxy/x/mcp", "/_proxy", "/metrics", "/healthz"])
def test_an_upstream_may_not_take_the_proxys_own_paths(tmp_path: Path, path: str) -> None:
    config_file = tmp_path / "proxy.toml"
    config_file.write_text(f'[upstreams.a]\nurl = "http://a/mcp"\npath = "{path}"\n')
    with pytest.raises(ConfigError, match=r"must not be one of the proxy.s own paths"):
        build_config(config_file=str(config_file), flags={}, environ={})


def test_the_page_shows_upstream_urls_without_credentials_or_query_values() -> None:
    assert (
        upstream_display("https://user:pw@mcp.example.com:8443/mcp?api_key=x#f")
        == "https://***@mcp.example.com:8443/mcp?api_key=***#***"
    )
    assert upstream_display("http://[::1]:9/mcp") == "http://[::1]:9/mcp"
