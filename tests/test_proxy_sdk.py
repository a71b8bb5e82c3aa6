"""The official MCP SDK client through the proxy to the official SDK server, across session deaths."""

from __future__ import annotations

import asyncio

import pytest
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent

from tests.conftest import ProxyFactory, UpstreamProcess, mcp_session


def text_of(result: object) -> str:
    content = getattr(result, "content")
    assert content and isinstance(content[0], TextContent)
    return content[0].text


async def test_tool_call_survives_upstream_restart(upstream: UpstreamProcess, start_proxy: ProxyFactory) -> None:
    proxy_url = await start_proxy(upstream.url)
    async with mcp_session(proxy_url) as session:
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"
        await upstream.restart()
        assert text_of(await session.call_tool("echo", {"text": "after"})) == "after"
        stats = await upstream.stats()
        assert stats["initialize"] == 1, "the restarted upstream was re-initialized exactly once"


async def test_without_the_proxy_the_sdk_client_fails_after_upstream_restart(upstream: UpstreamProcess) -> None:
    async with mcp_session(upstream.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"
        await upstream.restart()
        with pytest.raises(MCPError, match="Session not found"):
            await session.call_tool("echo", {"text": "after"})
