"""The bridge across 2026-07-28 when things go wrong mid-call: the session ends, the upstream leaves or
changes era while a bridged call waits for the client's input. Each call still ends with a JSON-RPC
response carrying its id (never a cut stream, never a hang)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp.shared.exceptions import MCPError

from mcp_heal_proxy.bridge.core import Bridge
from mcp_heal_proxy.front.app import PROXIES_KEY
from mcp_heal_proxy.wire.jsonrpc import parse_post_body
from tests.conftest import (
    INITIALIZE_PARAMS,
    MCP_HEADERS,
    ModernUpstreamProcess,
    ProxyFactory,
    echo_call,
    post_on_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.test_bridge import LegacyClient

# A client that can answer elicitations (else the upstream refuses the call that needs one).
ELICITING = {**INITIALIZE_PARAMS, "capabilities": {"elicitation": {}}}


async def _initialize(http: aiohttp.ClientSession, url: str) -> str:
    """Initialize as a client that answers elicitations; return its session id."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": ELICITING}
    async with http.post(url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 200, await response.text()
        session_id: str = response.headers["Mcp-Session-Id"]
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(url, json=initialized, headers=session_headers(session_id)) as response:
        assert response.status == 202
    return session_id


def _events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an SSE body."""
    messages = []
    for block in raw.decode().split("\n\n"):
        data = [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
        if data:
            messages.append(json.loads("\n".join(data)))
    return messages


async def _elicited_call(http: aiohttp.ClientSession, url: str, session_id: str, request_id: int) -> Any:
    """POST a call of ask_name; return the open answer once its elicitation/create arrived, and the request."""
    call = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": "ask_name", "arguments": {}}}
    answer = await http.post(url, json=call, headers=session_headers(session_id))
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    async with asyncio.timeout(10):
        while True:
            messages = _events(await answer.content.readuntil(b"\n\n"))
            if messages and messages[0].get("method") == "elicitation/create":
                return answer, messages[0]


async def test_a_delete_while_a_call_waits_for_input_answers_the_call(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """DELETE of the session while its call waits for the client's elicitation answer: the call's stream
    ends with a JSON-RPC error carrying its id (the session ended), not cut."""
    proxy = await start_proxy(modern_upstream.url, era="modern")
    session_id = await _initialize(http, proxy.url)
    answer, _ = await _elicited_call(http, proxy.url, session_id, 7)
    async with answer:
        async with http.delete(proxy.url, headers=session_headers(session_id)) as deleted:
            assert deleted.status == 200
        async with asyncio.timeout(10):
            rest = _events(await answer.read())
    responses = [message for message in rest if message.get("id") == 7]
    assert len(responses) == 1, rest
    assert "ended" in responses[0]["error"]["message"], responses[0]


async def test_an_upstream_gone_legacy_after_an_input_round_answers_the_call(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The call's SSE answer has started (an elicitation went to the client); the upstream is replaced by a
    handshake-era one before the client answers. The call sent again with the answer meets a 400 that is
    no modern error: the stream ends with an error carrying the call's id, and the session is gone (404)."""
    proxy = await start_proxy(modern_upstream.url, era="modern")
    session_id = await _initialize(http, proxy.url)
    answer, asked = await _elicited_call(http, proxy.url, session_id, 8)
    async with answer:
        await modern_upstream.stop()
        legacy = ModernUpstreamProcess(legacy_only=True)
        legacy.port = modern_upstream.port
        await legacy.start()
        try:
            reply = {"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "accept", "content": {"name": "Ada"}}}
            async with http.post(proxy.url, json=reply, headers=session_headers(session_id)) as taken:
                assert taken.status == 202
            async with asyncio.timeout(10):
                rest = _events(await answer.read())
        finally:
            await legacy.stop()
    responses = [message for message in rest if message.get("id") == 8]
    assert len(responses) == 1, rest
    assert responses[0]["error"]["code"] == -32001, responses[0]
    assert "initialize again" in responses[0]["error"]["message"], responses[0]


@pytest.mark.parametrize("discover_after", ["refused", "legacy"])
async def test_a_32022_the_upstream_does_not_take_back_ends_the_bridged_session(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    start_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    discover_after: str,
) -> None:
    """A bridged request refused with -32022: when server/discover then fails (``refused``), or the refusal
    names a handshake-era version (``legacy``: the upstream speaks it now), the bridged session ends (404
    with the request's id, so the client initializes again) instead of the -32022 reaching the client."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body["method"])
        if body["method"] == "server/discover" and len(seen) == 1:
            result = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "resultType": "complete"}
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result})
        supported = ["2025-11-25"] if discover_after == "legacy" else ["2026-07-28"]
        if body["method"] == "server/discover":
            return web.json_response(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": "no"}}, status=400
            )
        error = {"code": -32022, "message": "Unsupported protocol version", "data": {"supported": supported}}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "error": error}, status=400)

    app = web.Application()
    app.router.add_post("/mcp", handle)
    server = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")), era="modern")
    session_id = await raw_initialize(http, proxy.url)
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(3))
    assert status == 404, answer
    assert answer["id"] == 3
    expected = ["server/discover", "tools/call"] + (["server/discover"] if discover_after == "refused" else [])
    assert seen == expected


async def test_over_stdio_an_upstream_gone_legacy_is_initialized_again(
    modern_upstream: ModernUpstreamProcess,
) -> None:
    """The stdio bridge's bridged session, and the upstream replaced by a handshake-era one: the request
    that meets it gets an error with its id naming what happened; the next one goes upstream on a session
    the proxy initializes with the client's own initialize params (the client cannot initialize again)."""
    client = LegacyClient()
    legacy = ModernUpstreamProcess(legacy_only=True)
    legacy.port = modern_upstream.port
    try:
        async with client.session(modern_upstream.url, stdio=True) as session:
            assert (await session.call_tool("echo", {"text": "a"})).structured_content == {"result": "a"}
            await modern_upstream.stop()
            await legacy.start()
            with pytest.raises(MCPError) as gone:
                async with asyncio.timeout(10):
                    await session.call_tool("echo", {"text": "b"})
            assert "2026-07-28" in gone.value.error.message, gone.value.error
            async with asyncio.timeout(10):
                again = await session.call_tool("echo", {"text": "c"})
            assert again.structured_content == {"result": "c"}
            assert "echo" in {tool.name for tool in (await session.list_tools()).tools}
        stats = await legacy.stats()
        assert stats["initialize"] == 1
        assert stats["meta"] == {}, "the proxy sent 2026-07-28 requests to the handshake-era upstream"
    finally:
        await legacy.stop()


async def test_a_call_closed_while_it_waits_for_input_lets_go_of_its_input_requests_at_once(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A bridged call closed while its input request waits for the client's answer (its client left): the
    input request is forgotten as the call closes, not later when the garbage collector gets to it."""
    proxy = await start_proxy(modern_upstream.url, era="modern")
    session_id = await _initialize(http, proxy.url)
    record = await proxy.record(session_id)
    assert record is not None
    bridge: Bridge = proxy.app[PROXIES_KEY]["/mcp"]._engine.bridge
    call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "ask_name", "arguments": {}}}
    message = parse_post_body(json.dumps(call).encode()).messages[0]
    messages = bridge.call({}, record, message, 30.0)
    async with asyncio.timeout(10):
        async for item in messages:
            if item is not None and item.get("method") == "elicitation/create":
                break
    assert len(bridge._inputs) == 1
    await messages.aclose()
    assert bridge._inputs == {}, "the input request outlived its call"


async def test_a_forgotten_bridged_session_ends_its_listen_and_its_calls(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The status page's forget (as idle expiry and eviction) ends a bridged session the proxy holds: its
    GET stream (the upstream listen) ends, a call waiting for the client's input answers with an error
    carrying its id, and the bridge keeps nothing of it."""
    proxy = await start_proxy(modern_upstream.url, era="modern")
    base = proxy.url.removesuffix("/mcp")
    bridge: Bridge = proxy.app[PROXIES_KEY]["/mcp"]._engine.bridge
    session_id = await _initialize(http, proxy.url)
    get_headers = {**session_headers(session_id), "Accept": "text/event-stream"}
    async with http.get(proxy.url, headers=get_headers) as stream:
        assert stream.status == 200
        await wait_until(lambda: session_id in bridge._listening, 10, "the listen is open")
        answer, _ = await _elicited_call(http, proxy.url, session_id, 10)
        async with answer:
            async with http.delete(f"{base}/_proxy/api/sessions/{session_id}") as forgotten:
                assert forgotten.status == 200
            async with asyncio.timeout(10):
                rest = _events(await answer.read())
                await stream.read()  # the GET stream ends
    responses = [message for message in rest if message.get("id") == 10]
    assert len(responses) == 1, rest
    assert responses[0]["error"]["code"] == -32001, responses[0]
    assert session_id not in bridge._listened
    await wait_until(lambda: session_id not in bridge._listening, 10, "the listen ended")


async def test_an_answer_to_the_proxys_input_request_needs_no_stream_slot(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """Two stream slots per session, both taken (the GET stream, a call waiting for an elicitation): the
    client's POSTed answer is the proxy's to take, never upstream, so it takes no slot and the call ends."""
    proxy = await start_proxy(modern_upstream.url, era="modern", max_streams_per_session=2, stream_slot_wait=0.3)
    session_id = await _initialize(http, proxy.url)
    get_headers = {**session_headers(session_id), "Accept": "text/event-stream"}
    async with http.get(proxy.url, headers=get_headers) as stream:
        assert stream.status == 200
        answer, asked = await _elicited_call(http, proxy.url, session_id, 11)
        async with answer:
            reply = {"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "accept", "content": {"name": "Ada"}}}
            async with http.post(proxy.url, json=reply, headers=session_headers(session_id)) as taken:
                assert taken.status == 202, await taken.text()
            async with asyncio.timeout(10):
                rest = _events(await answer.read())
    responses = [message for message in rest if message.get("id") == 11]
    assert responses == [{"jsonrpc": "2.0", "id": 11, "result": responses[0].get("result")}], rest
    assert responses[0]["result"]["structuredContent"] == {"result": "hello Ada"}


async def test_a_client_that_drops_its_stream_does_not_cancel_the_upstream_call(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A handshake-era client dropping its POST stream is not cancelling (that is notifications/cancelled):
    the proxy keeps reading the upstream answer (closing it would be the 2026-07-28 cancellation), so the
    tool runs to its end."""
    proxy = await start_proxy(modern_upstream.url, era="modern")
    session_id = await _initialize(http, proxy.url)
    params = {"name": "steps", "arguments": {"count": 20}, "_meta": {"progressToken": "p"}}
    call = {"jsonrpc": "2.0", "id": 12, "method": "tools/call", "params": params}
    async with http.post(proxy.url, json=call, headers=session_headers(session_id)) as answer:
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        async with asyncio.timeout(10):
            assert b"notifications/progress" in await answer.content.readuntil(b"\n\n")
        answer.close()  # the client leaves, without notifications/cancelled
    await wait_until(lambda: _stat(modern_upstream, "steps_done"), 10, "the tool ran to its end")


async def _stat(server: ModernUpstreamProcess, key: str) -> bool:
    return bool((await server.stats())[key])
