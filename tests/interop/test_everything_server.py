"""Python SDK client -> proxy -> the TypeScript reference server (server-everything, streamable HTTP).

server-everything keeps its sessions in a map in memory and answers a request for an unknown session
with 400 "Bad Request: No valid session ID provided", not the spec's 404. The proxy must heal that too.
"""

from __future__ import annotations

import asyncio

import pytest
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent

from tests.conftest import mcp_session
from tests.interop.conftest import EverythingServer, ProxyFactory

pytestmark = pytest.mark.interop

CALL_TIMEOUT = 20.0


async def echo(session: ClientSession, message: str) -> str:
    async with asyncio.timeout(CALL_TIMEOUT):
        result = await session.call_tool("echo", {"message": message})
    assert not result.is_error, result
    content = result.content
    assert content, result
    assert isinstance(content[0], TextContent)
    text: str = content[0].text
    return text


async def test_python_client_survives_server_everything_restart_through_proxy(
    everything: EverythingServer, proxy_process: ProxyFactory
) -> None:
    proxy = await proxy_process(everything.url)
    async with mcp_session(proxy.url) as session:
        assert await echo(session, "before") == "Echo: before"
        await everything.restart()
        assert await echo(session, "after") == "Echo: after", proxy.log()
    assert proxy.healed_on("http_400"), "server-everything signals expiry with 400"


async def test_python_client_fails_after_server_everything_restart_without_proxy(
    everything: EverythingServer,
) -> None:
    async with mcp_session(everything.url) as session:
        assert await echo(session, "before") == "Echo: before"
        await everything.restart()
        # The SDK client reports the 400 generically; it never re-initializes.
        with pytest.raises(MCPError, match="Server returned an error response"):
            await echo(session, "after")
