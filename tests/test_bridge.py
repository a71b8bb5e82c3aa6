"""The bridge across 2026-07-28: handshake-era clients through the proxy to a modern-only upstream
(tests/modern_upstream.py), and era detection per upstream."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from pydantic import FileUrl

from mcp_heal_proxy.config import UpstreamConfig
from mcp_heal_proxy.connect_check import check_upstream
from mcp_heal_proxy.front.app import STORE_KEY
from mcp_heal_proxy.inventory import CachedStore, summary
from mcp_heal_proxy.watch import format_sessions
from tests.conftest import (
    INITIALIZE_PARAMS,
    MCP_HEADERS,
    ModernUpstreamProcess,
    ProxyFactory,
    UpstreamProcess,
    echo_call,
    mcp_session,
    post_on_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.fake_upstream import FakeUpstream
from tests.test_stdio import BRIDGE
from tests.test_store_redis import RedisServer


async def test_legacy_client_fails_directly(modern_upstream: ModernUpstreamProcess) -> None:
    """Without the proxy, the SDK's handshake-era ClientSession cannot talk to a modern-only server: its
    initialize is refused with -32022 naming the versions the server speaks."""
    with pytest.raises((MCPError, BaseExceptionGroup)) as failed:
        async with mcp_session(modern_upstream.url):
            pass
    refused = failed.value
    while isinstance(refused, BaseExceptionGroup):
        refused = refused.exceptions[0]
    assert isinstance(refused, MCPError)
    assert refused.error.code == -32022
    assert refused.error.data["supported"] == ["2026-07-28"]
    assert (await modern_upstream.stats())["initialize_refused"] == 1


# The stdio client gives its command a minimal environment: the code under test must still be first.
CODE_PATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None


class LegacyClient:
    """What a handshake-era client received through the proxy: progress, log messages, list changes,
    and the elicitations it answered."""

    def __init__(self) -> None:
        self.progress: list[float] = []
        self.logs: list[Any] = []
        self.notifications: list[str] = []
        self.elicited: list[str] = []
        self.list_changed = asyncio.Event()
        self.sampled: list[str] = []
        self.links: list[str | None] = []
        self.completed: list[str] = []
        self.updated: list[str] = []
        self.resource_updated = asyncio.Event()

    async def elicit(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.elicited.append(params.message)
        if isinstance(params, types.ElicitRequestURLParams):
            self.links.append(params.elicitation_id)  # the user was sent to params.url
            return types.ElicitResult(action="accept")
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def sample(self, context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.sampled.append(
            params.messages[0].content.text if isinstance(params.messages[0].content, types.TextContent) else ""
        )
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="old pond, frog"), model="fake"
        )

    async def roots(self, context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=FileUrl("file:///work"), name="work")])

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params.data)

    async def message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self.notifications.append(message.method)
            self.list_changed.set()
        if isinstance(message, types.ElicitCompleteNotification):
            self.completed.append(message.params.elicitation_id)
        if isinstance(message, types.ResourceUpdatedNotification):
            self.updated.append(str(message.params.uri))
            self.resource_updated.set()

    async def on_progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.progress.append(progress)

    @contextlib.asynccontextmanager
    async def session(self, url: str, *, stdio: bool = False) -> AsyncIterator[ClientSession]:
        """Over HTTP to ``url``, or (``stdio``) launching the stdio bridge to it as its server command."""
        transport = (
            stdio_client(StdioServerParameters(command=BRIDGE, args=["stdio", "--upstream", url], env=CODE_PATH))
            if stdio
            else streamable_http_client(url)
        )
        async with (
            transport as (read_stream, write_stream),
            ClientSession(
                read_stream,
                write_stream,
                elicitation_callback=self.elicit,
                sampling_callback=self.sample,
                list_roots_callback=self.roots,
                logging_callback=self.log,
                message_handler=self.message,
            ) as session,
        ):
            await session.initialize()
            yield session

    async def exercise(self, session: ClientSession) -> None:
        """List tools, call them, receive progress and logs, answer an elicitation, get list_changed."""
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"echo", "steps", "ask_name", "add_tool"} <= tools
        assert (await session.call_tool("echo", {"text": "hi"})).structured_content == {"result": "hi"}
        with pytest.warns(MCPDeprecationWarning):  # logging/setLevel left the protocol in 2026-07-28
            await session.set_logging_level("debug")
        await session.send_ping()
        done = await session.call_tool("steps", {"count": 2}, progress_callback=self.on_progress)
        assert done.structured_content == {"result": "done after 2 steps"}
        assert self.progress[-2:] == [1, 2]
        assert self.logs[-2:] == ["did step 1", "did step 2"]
        greeted = await session.call_tool("ask_name", {})
        assert greeted.structured_content == {"result": "hello Ada"}, greeted
        assert self.elicited[-1] == "What is your name?"
        self.list_changed.clear()
        await session.call_tool("add_tool", {})
        async with asyncio.timeout(10):
            await self.list_changed.wait()
        assert "extra" in {tool.name for tool in (await session.list_tools()).tools}


async def test_legacy_client_through_proxy(modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory) -> None:
    """The SDK's ClientSession through the proxy to the modern-only upstream: the proxy answers its
    initialize from server/discover and bridges every request; the upstream never sees an initialize
    past the first (auto: refused with -32022, then the era is known)."""
    proxy = await start_proxy(modern_upstream.url)
    client = LegacyClient()
    async with client.session(proxy.url) as session:
        await client.exercise(session)
    stats = await modern_upstream.stats()
    assert stats["initialize_refused"] == 1
    meta = stats["meta"]["tools/call"]
    assert meta["io.modelcontextprotocol/protocolVersion"] == "2026-07-28"
    assert meta["io.modelcontextprotocol/logLevel"] == "debug"
    assert "elicitation" in meta["io.modelcontextprotocol/clientCapabilities"]
    # A second client: the proxy knows the era now, its initialize never goes upstream.
    async with client.session(proxy.url) as session:
        await session.list_tools()
    assert (await modern_upstream.stats())["initialize_refused"] == 1


async def test_era_pinned_modern_never_sends_initialize(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory
) -> None:
    """era = "modern": the first initialize is answered from server/discover, none goes upstream."""
    proxy = await start_proxy(modern_upstream.url, era="modern")
    async with mcp_session(proxy.url) as session:
        assert (await session.call_tool("echo", {"text": "pinned"})).structured_content == {"result": "pinned"}
    assert (await modern_upstream.stats())["initialize_refused"] == 0


async def test_era_pinned_legacy_passes_the_refusal(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """era = "legacy": never bridged; the upstream's refusal reaches the client as it came."""
    proxy = await start_proxy(modern_upstream.url, era="legacy")
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}
    async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == -32022


async def test_dual_era_upstream_keeps_real_sessions(upstream: UpstreamProcess, start_proxy: ProxyFactory) -> None:
    """A dual-era upstream (the SDK server as it ships) accepts the initialize: a real upstream session,
    not a bridged one, whatever server/discover would say."""
    proxy = await start_proxy(upstream.url)
    async with mcp_session(proxy.url) as session:
        await session.list_tools()
        assert len(await upstream.live_sessions()) == 1
    assert (await upstream.stats())["initialize"] == 1


async def test_legacy_client_through_the_stdio_bridge(modern_upstream: ModernUpstreamProcess) -> None:
    """The SDK's ClientSession launching ``mcp-heal-proxy stdio`` against the modern-only upstream: the
    same checks as over HTTP, each message a line."""
    client = LegacyClient()
    async with client.session(modern_upstream.url, stdio=True) as session:
        await client.exercise(session)
    assert (await modern_upstream.stats())["initialize_refused"] == 1


async def test_an_upstream_restart_costs_nothing_between_calls(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory
) -> None:
    """The upstream has no sessions to lose: after a restart the bridged session goes on, and its GET
    stream (fed from subscriptions/listen) is reopened, with one list_changed for what the gap lost."""
    proxy = await start_proxy(modern_upstream.url)
    client = LegacyClient()
    async with client.session(proxy.url) as session:
        await client.exercise(session)
        client.list_changed.clear()
        await modern_upstream.restart()
        async with asyncio.timeout(10):
            await client.list_changed.wait()  # the reopened listen said the tool list may have changed
        await client.exercise(session)


async def test_a_proxy_restart_keeps_the_bridged_session(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The bridged session is the proxy's own: its record (version, client info and capabilities, log
    level) is in the store, so a new proxy on the same port and store serves the client's next calls."""
    state = str(tmp_path / "sessions.db")
    proxy = await start_proxy(modern_upstream.url, state=state)
    client = LegacyClient()
    async with client.session(proxy.url) as session:
        await client.exercise(session)
        port = proxy.port
        await proxy.stop()
        await start_proxy(modern_upstream.url, state=state, port=port)
        client.logs.clear()
        done = await session.call_tool("steps", {"count": 1}, progress_callback=client.on_progress)
        assert done.structured_content == {"result": "done after 1 steps"}
        assert client.logs == ["did step 1"], "the log level set before the restart was lost"
        await client.exercise(session)
    meta = (await modern_upstream.stats())["meta"]["tools/call"]
    assert meta["io.modelcontextprotocol/clientInfo"]["name"] == "mcp"


async def test_a_call_broken_by_an_upstream_restart_gets_an_error_with_its_id(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory
) -> None:
    """A tool call the upstream dropped mid-way is answered with an error (never replayed: it may have
    run); the session goes on."""
    proxy = await start_proxy(modern_upstream.url)
    client = LegacyClient()
    async with client.session(proxy.url) as session:
        started = asyncio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            started.set()

        call = asyncio.ensure_future(session.call_tool("hang", {}, progress_callback=on_progress))  # noqa: TID251 (awaited)
        async with asyncio.timeout(10):
            await started.wait()
        await modern_upstream.restart()
        with pytest.raises(MCPError) as broken:
            async with asyncio.timeout(10):
                await call
        assert broken.value.error.code == -32002
        assert "not replayed" in broken.value.error.message
        assert (await session.call_tool("echo", {"text": "after"})).structured_content == {"result": "after"}
    assert (await modern_upstream.stats())["tools_call"] == 1, "the broken call was sent again"


async def test_the_wire_a_legacy_client_sees(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """Raw HTTP: the initialize the proxy answers, results without the 2026-07-28 members, a modern
    404 -32601 as a JSON-RPC error in HTTP 200 (a 404 would mean "session gone"), DELETE ending it."""
    proxy = await start_proxy(modern_upstream.url, era="modern")
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}
    async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 200
        session_id = response.headers["Mcp-Session-Id"]
        result = (await response.json())["result"]
    assert result["protocolVersion"] == "2025-11-25"
    assert result["serverInfo"]["name"] == "modern-only-upstream"
    assert result["instructions"] == "a 2026-07-28-only server for tests"
    assert "logging" in result["capabilities"]
    assert result["capabilities"]["tools"] == {"listChanged": True}
    tools = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    status, _, answer = await post_on_session(http, proxy.url, session_id, tools)
    assert status == 200
    assert not {"resultType", "ttlMs", "cacheScope", "_meta"} & set(answer["result"]), answer["result"].keys()
    unknown = {"jsonrpc": "2.0", "id": 3, "method": "nope/x", "params": {}}
    status, _, answer = await post_on_session(http, proxy.url, session_id, unknown)
    assert (status, answer["id"], answer["error"]["code"]) == (200, 3, -32601)
    async with http.delete(proxy.url, headers=session_headers(session_id)) as response:
        assert response.status == 200
    status, _, _ = await post_on_session(http, proxy.url, session_id, tools)
    assert status == 404


async def test_a_bridged_session_outlives_the_loss_of_its_store(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A proxy restart with a store that kept nothing (``:memory:``): the sealed session id says the
    session was bridged, so the new proxy re-creates it as one (no initialize goes upstream)."""
    proxy = await start_proxy(modern_upstream.url, state=":memory:", session_key="k" * 32)
    client = LegacyClient()
    async with client.session(proxy.url) as session:
        await session.list_tools()
        port = proxy.port
        await proxy.stop()
        await start_proxy(modern_upstream.url, state=":memory:", session_key="k" * 32, port=port)
        assert (await session.call_tool("echo", {"text": "restored"})).structured_content == {"result": "restored"}
    assert (await modern_upstream.stats())["initialize_refused"] == 1


async def test_status_sessions_and_metrics_say_the_era_and_which_sessions_are_bridged(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(modern_upstream.url)
    origin = proxy.url.removesuffix("/mcp")
    async with http.get(f"{origin}/_proxy/api/upstreams") as response:
        assert [upstream["era"] for upstream in (await response.json())["upstreams"]] == ["unknown"]
    async with mcp_session(proxy.url) as session:
        await session.list_tools()
        async with http.get(f"{origin}/_proxy/api/status") as response:
            status = await response.json()
        assert [upstream["era"] for upstream in status["upstreams"]] == ["modern"]
        assert [shown.get("bridged") for shown in status["sessions"]["shown"]] == [True]
        store = proxy.app[STORE_KEY]
        assert isinstance(store, CachedStore)
        rows = [summary(record, full=True) for record in store.records()]
        assert "(bridged to 2026-07-28)" in format_sessions(rows)
    async with http.get(f"{origin}/metrics") as response:
        metrics = await response.text()
    assert 'mcp_heal_proxy_upstream_era{era="modern",upstream="default"} 1.0' in metrics
    assert 'mcp_heal_proxy_upstream_era{era="unknown",upstream="default"} 0.0' in metrics
    assert 'mcp_heal_proxy_sessions_bridged_total{upstream="default"} 1.0' in metrics


async def test_sampling_roots_and_resource_subscriptions(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory
) -> None:
    """sampling/createMessage and roots/list come to the client as requests (from input_required), and a
    resources/subscribe the proxy answered makes the upstream's listen carry that resource's updates."""
    proxy = await start_proxy(modern_upstream.url)
    client = LegacyClient()
    async with client.session(proxy.url) as session:
        written = await session.call_tool("haiku", {"text": "frogs"})
        assert written.structured_content == {"result": "old pond, frog"}, written
        assert client.sampled == ["a haiku about frogs"]
        listed = await session.call_tool("roots", {})
        assert listed.structured_content == {"result": "file:///work"}, listed
        with pytest.warns(MCPDeprecationWarning):  # resources/subscribe left the protocol in 2026-07-28
            await session.subscribe_resource("file:///watched.txt")
        await session.call_tool("touch", {})
        async with asyncio.timeout(10):
            await client.resource_updated.wait()
        assert client.updated == ["file:///watched.txt"]
        store = proxy.app[STORE_KEY]
        assert isinstance(store, CachedStore)
        assert [record.subscriptions for record in store.records()] == [frozenset({"file:///watched.txt"})]


async def test_a_cancelled_call_closes_its_upstream_answer(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A legacy notifications/cancelled (its own POST) becomes the modern cancellation: the proxy closes
    the call's upstream answer, the tool stops, and the client's stream ends without a response."""
    proxy = await start_proxy(modern_upstream.url, era="modern")
    session_id = await raw_initialize(http, proxy.url)
    params = {"name": "hang", "arguments": {}, "_meta": {"progressToken": "p"}}
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}
    async with http.post(proxy.url, json=call, headers=session_headers(session_id)) as answer:
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        first = await answer.content.readuntil(b"\n\n")
        assert b"notifications/progress" in first
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7}}
        status, _, _ = await post_on_session(http, proxy.url, session_id, cancel)
        assert status == 202
        rest = await answer.read()
    assert b'"id":7' not in rest.replace(b" ", b""), "a response after the cancellation"
    await wait_until(lambda: stats_value(modern_upstream, "hang_cancelled"), 10, "the tool was cancelled upstream")


async def stats_value(server: ModernUpstreamProcess, key: str) -> bool:
    return bool((await server.stats())[key])


async def test_tool_arguments_marked_x_mcp_header_go_as_headers(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A call before any tools/list: the proxy knows no schema, the upstream refuses the missing
    Mcp-Param-Region (-32020), the proxy lists the tools and sends the call again with the header. Later
    calls carry it from the start."""
    proxy = await start_proxy(modern_upstream.url, era="modern")
    session_id = await raw_initialize(http, proxy.url)
    params = {"name": "regional", "arguments": {"region": "Zürich ", "query": "q"}}
    for request_id in (1, 2):
        call = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
        status, _, answer = await post_on_session(http, proxy.url, session_id, call)
        assert status == 200
        assert answer["result"]["structuredContent"] == {"result": "q in Zürich "}, answer
    methods = (await modern_upstream.stats())["methods"]
    assert methods == ["server/discover", "tools/call", "tools/list", "tools/call", "tools/call"], methods


async def test_an_upstream_that_turns_legacy_is_seen_again(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The modern-only upstream is replaced by a handshake-era one on the same address: a bridged
    request meets a 400 that is no modern error, so the bridged session ends (404: the client initializes
    again) and the next initialize goes upstream, where it gets a real upstream session."""
    proxy = await start_proxy(modern_upstream.url)
    session_id = await raw_initialize(http, proxy.url)
    tools = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    assert (await post_on_session(http, proxy.url, session_id, tools))[0] == 200
    await modern_upstream.stop()
    legacy = ModernUpstreamProcess(legacy_only=True, json_response=True)
    legacy.port = modern_upstream.port
    await legacy.start()
    try:
        status, _, answer = await post_on_session(http, proxy.url, session_id, tools)
        assert status == 404, answer
        assert answer["id"] == 2
        session_id = await raw_initialize(http, proxy.url)
        status, _, answer = await post_on_session(http, proxy.url, session_id, tools)
        assert status == 200
        assert "echo" in {tool["name"] for tool in answer["result"]["tools"]}
        assert (await legacy.stats())["initialize"] == 1
        async with http.get(proxy.url.removesuffix("/mcp") + "/_proxy/api/upstreams") as response:
            assert [upstream["era"] for upstream in (await response.json())["upstreams"]] == ["legacy"]
    finally:
        await legacy.stop()


async def test_a_json_answering_modern_upstream(start_proxy: ProxyFactory) -> None:
    """The modern-only upstream answering application/json (no progress stream): calls, an elicitation
    (the proxy turns the JSON input_required into an SSE answer), list_changed from the listen."""
    server = ModernUpstreamProcess(json_response=True)
    await server.start()
    try:
        proxy = await start_proxy(server.url)
        client = LegacyClient()
        async with client.session(proxy.url) as session:
            assert (await session.call_tool("echo", {"text": "j"})).structured_content == {"result": "j"}
            greeted = await session.call_tool("ask_name", {})
            assert greeted.structured_content == {"result": "hello Ada"}
            await session.call_tool("add_tool", {})
            async with asyncio.timeout(10):
                await client.list_changed.wait()
    finally:
        await server.stop()


@pytest.mark.parametrize("stdio", [False, True], ids=["http", "stdio"])
async def test_a_session_whose_upstream_turns_modern_only_is_bridged_from_then_on(
    start_proxy: ProxyFactory, stdio: bool
) -> None:
    """A handshake-era session on a legacy-only upstream; the upstream is replaced by a 2026-07-28-only
    one on the same address. The session's next request is refused (400 -32022, unrun): the proxy sees the
    modern error, checks server/discover and makes the session a bridged one; the request goes again, and
    everything after works as for a session bridged from the start."""
    legacy = ModernUpstreamProcess(legacy_only=True)
    await legacy.start()
    modern = ModernUpstreamProcess()
    modern.port = legacy.port
    try:
        url = legacy.url if stdio else (await start_proxy(legacy.url)).url
        client = LegacyClient()
        async with client.session(url, stdio=stdio) as session:
            assert (await session.call_tool("echo", {"text": "legacy"})).structured_content == {"result": "legacy"}
            assert (await legacy.stats())["initialize"] == 1
            await legacy.stop()
            await modern.start()
            assert (await session.call_tool("echo", {"text": "modern"})).structured_content == {"result": "modern"}
            await client.exercise(session)
        assert (await modern.stats())["initialize_refused"] == 0
    finally:
        await legacy.stop()
        await modern.stop()


async def test_bridged_sessions_count_against_max_sessions(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(modern_upstream.url, era="modern", max_sessions=2)
    first = await raw_initialize(http, proxy.url)
    for _ in range(2):
        await raw_initialize(http, proxy.url)
    assert len(proxy.app[STORE_KEY]) == 2
    assert await proxy.record(first) is None, "the least recently used session stayed"


@pytest.mark.parametrize("code", [-32602, -32022])
async def test_a_refused_initialize_that_is_not_modern_only_reaches_the_client_whole(
    fake: tuple[FakeUpstream, str], start_proxy: ProxyFactory, http: aiohttp.ClientSession, code: int
) -> None:
    """A legacy server refusing an initialize (400, -32602), or one answering -32022 whose server/discover
    fails (not modern either): the client gets the upstream's refusal byte for byte, from the bytes the
    proxy read to look at it."""
    upstream, url = fake
    refusal = {"jsonrpc": "2.0", "id": 1, "error": {"code": code, "message": "no", "data": {"supported": ["1999"]}}}

    async def refuse(request: web.Request, body: Any) -> web.StreamResponse:
        return web.json_response(refusal, status=400)

    upstream.initializes = 1  # every initialize is a "re-initialize", which the knob answers
    upstream.on_reinitialize = refuse
    proxy = await start_proxy(url)
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}
    async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 400
        assert await response.json() == refusal
    async with http.get(proxy.url.removesuffix("/mcp") + "/_proxy/api/upstreams") as response:
        assert [upstream["era"] for upstream in (await response.json())["upstreams"]] == ["unknown"]


async def test_an_oauth_challenge_passes_to_a_bridged_client(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The client's Authorization goes upstream on bridged requests, and an upstream's 401 with a Bearer
    challenge reaches the client as a 401 with its challenge, rewritten by the OAuth pass-through (the
    client's OAuth flow starts at the proxy), as without the bridge."""
    server = ModernUpstreamProcess(json_response=True, bearer="good")
    await server.start()
    try:
        proxy = await start_proxy(server.url)
        headers = {**MCP_HEADERS, "Authorization": "Bearer good"}
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}
        async with http.post(proxy.url, json=body, headers=headers) as response:
            assert response.status == 200
            session_id = response.headers["Mcp-Session-Id"]
        on_session = {**session_headers(session_id), "Authorization": "Bearer good"}
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "a"}},
        }
        async with http.post(proxy.url, json=call, headers=on_session) as response:
            assert response.status == 200
            assert (await response.json())["result"]["structuredContent"] == {"result": "a"}
        async with http.post(proxy.url, json=call, headers={**on_session, "Authorization": "Bearer stale"}) as response:
            assert response.status == 401
            challenge = response.headers["WWW-Authenticate"]
            assert challenge.startswith('Bearer error="invalid_token"')
            # Rewritten as the OAuth pass-through rewrites every challenge: the metadata is the proxy's.
            assert f"127.0.0.1:{proxy.port}/.well-known/oauth-protected-resource" in challenge, challenge
    finally:
        await server.stop()


async def test_a_url_mode_elicitation_gets_its_id_and_completion(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory
) -> None:
    """2026-07-28 URL-mode elicitation has no elicitationId; 2025-11-25 requires one and a
    notifications/elicitation/complete: the proxy mints the id and says complete when the call is."""
    proxy = await start_proxy(modern_upstream.url)
    client = LegacyClient()
    async with client.session(proxy.url) as session:
        linked = await session.call_tool("link", {})
        assert linked.structured_content == {"result": "linked (accept)"}, linked
    assert len(client.links) == 1
    assert client.links[0] is not None
    assert client.completed == client.links


async def test_check_config_connect_says_the_upstream_is_bridged(modern_upstream: ModernUpstreamProcess) -> None:
    """``check-config --connect`` against a 2026-07-28-only upstream: its refused initialize is not a
    failure when server/discover answers (the proxy bridges its handshake-era clients)."""
    outcome = await check_upstream(UpstreamConfig(url=modern_upstream.url), ":memory:")
    assert outcome.ok, outcome.line()
    assert outcome.passed[-2:] == [
        "HTTP 400 to initialize (a 2026-07-28-only server)",
        "MCP server/discover (modern-only-upstream, protocol 2026-07-28): handshake-era clients are bridged",
    ]
    refused = await check_upstream(UpstreamConfig(url=modern_upstream.url, era="legacy"), ":memory:")
    assert refused.stopped_at == "HTTP", refused.line()


async def test_a_bridged_initialize_without_credentials_gets_the_upstreams_challenge(
    start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """The era is known (modern) and a client comes without its token: server/discover is refused with
    401, so the initialize goes upstream as it came and its 401 challenge reaches the client, which logs
    in and initializes again (bridged)."""
    server = ModernUpstreamProcess(json_response=True, bearer="good")
    await server.start()
    try:
        proxy = await start_proxy(server.url, era="modern")
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS}
        async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        authorized = {**MCP_HEADERS, "Authorization": "Bearer good"}
        async with http.post(proxy.url, json=body, headers=authorized) as response:
            assert response.status == 200
            assert "Mcp-Session-Id" in response.headers
    finally:
        await server.stop()


async def test_another_replica_serves_a_bridged_session(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Two proxies sharing a Redis store (and a session key): a session bridged by one is served by the
    other, with the log level the client set through the first."""
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        await _two_replicas(modern_upstream, start_proxy, http, redis.url)
    finally:
        await redis.stop()


async def _two_replicas(
    modern_upstream: ModernUpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession, state: str
) -> None:
    first = await start_proxy(modern_upstream.url, state=state, session_key="s" * 32)
    second = await start_proxy(modern_upstream.url, state=state, session_key="s" * 32)
    session_id = await raw_initialize(http, first.url)
    level = {"jsonrpc": "2.0", "id": 1, "method": "logging/setLevel", "params": {"level": "warning"}}
    assert (await post_on_session(http, first.url, session_id, level))[0] == 200
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "b"}}}
    status, _, answer = await post_on_session(http, second.url, session_id, call)
    assert status == 200
    assert answer["result"]["structuredContent"] == {"result": "b"}
    meta = (await modern_upstream.stats())["meta"]["tools/call"]
    assert meta["io.modelcontextprotocol/logLevel"] == "warning"


async def test_a_later_32022_makes_the_proxy_look_again_and_retry_once(
    aiohttp_server: Callable[..., Awaitable[TestServer]], start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A modern upstream that refuses one bridged request with -32022 (a deploy moved it): the proxy asks
    server/discover again and, the upstream still speaking 2026-07-28, sends the request once more."""
    seen: list[str] = []
    refused = {"done": False}

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body["method"])
        if body["method"] == "server/discover":
            result = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "resultType": "complete"}
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result})
        if not refused["done"]:
            refused["done"] = True
            error = {"code": -32022, "message": "Unsupported protocol version", "data": {"supported": ["2026-07-28"]}}
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "error": error}, status=400)
        called: dict[str, Any] = {"content": [{"type": "text", "text": "ok"}], "resultType": "complete"}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": called})

    app = web.Application()
    app.router.add_post("/mcp", handle)
    server = await aiohttp_server(app)
    proxy = await start_proxy(str(server.make_url("/mcp")), era="modern")
    session_id = await raw_initialize(http, proxy.url)
    status, _, answer = await post_on_session(http, proxy.url, session_id, echo_call(3))
    assert status == 200
    assert answer["result"] == {"content": [{"type": "text", "text": "ok"}]}
    assert seen == ["server/discover", "tools/call", "server/discover", "tools/call"]
