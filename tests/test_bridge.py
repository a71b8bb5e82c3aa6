"""The bridge across 2026-07-28: handshake-era clients through the proxy to a modern-only upstream
(tests/modern_upstream.py), and era detection per upstream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError

from tests.conftest import (
    INITIALIZE_PARAMS,
    MCP_HEADERS,
    ModernUpstreamProcess,
    ProxyFactory,
    UpstreamProcess,
    mcp_session,
)


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


class LegacyClient:
    """What a handshake-era client received through the proxy: progress, log messages, list changes,
    and the elicitations it answered."""

    def __init__(self) -> None:
        self.progress: list[float] = []
        self.logs: list[Any] = []
        self.notifications: list[str] = []
        self.elicited: list[str] = []
        self.list_changed = asyncio.Event()

    async def elicit(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.elicited.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params.data)

    async def message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self.notifications.append(message.method)
            self.list_changed.set()

    async def on_progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.progress.append(progress)

    @contextlib.asynccontextmanager
    async def session(self, url: str) -> AsyncIterator[ClientSession]:
        async with (
            streamable_http_client(url) as (read_stream, write_stream),
            ClientSession(
                read_stream,
                write_stream,
                elicitation_callback=self.elicit,
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
