"""The official MCP SDK client through the proxy to the official SDK server, across session deaths."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent

from tests.conftest import (
    ProxyFactory,
    UpstreamProcess,
    mcp_session,
    raw_initialize,
    session_headers,
    wait_until,
)


def text_of(result: CallToolResult) -> str:
    assert result.content
    first = result.content[0]
    assert isinstance(first, TextContent)
    return first.text


async def test_tool_call_survives_upstream_restart(upstream: UpstreamProcess, start_proxy: ProxyFactory) -> None:
    proxy = await start_proxy(upstream.url)
    async with mcp_session(proxy.url) as session:
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


@pytest.mark.parametrize("restart_first", [False, True], ids=["live-session", "healed-session"])
async def test_progress_reaches_the_client_while_the_tool_still_runs(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, restart_first: bool
) -> None:
    proxy = await start_proxy(sse_upstream.url)
    steps = 3
    arrived = [asyncio.Event() for _ in range(steps)]

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrived[int(progress) - 1].set()

    async with mcp_session(proxy.url) as session, asyncio.TaskGroup() as tasks:
        if restart_first:
            await sse_upstream.restart()
        call = tasks.create_task(session.call_tool("gated_steps", {"steps": steps}, progress_callback=on_progress))
        for step in range(1, steps + 1):
            # The upstream tool is blocked until we release this step, so the progress event can only
            # be here if the proxy forwarded it while the answer was still streaming.
            async with asyncio.timeout(10):
                await arrived[step - 1].wait()
            assert not call.done()
            await sse_upstream.release(step)
        async with asyncio.timeout(10):
            assert text_of(await call) == f"done after {steps} steps"


async def test_concurrent_calls_on_an_expired_session_share_one_reinitialize(
    upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(upstream.url)
    async with mcp_session(proxy.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "warm"})) == "warm"
        await upstream.restart()
        results = await asyncio.gather(*(session.call_tool("echo", {"text": f"call {i}"}) for i in range(20)))
        assert [text_of(result) for result in results] == [f"call {i}" for i in range(20)]
        stats = await upstream.stats()
        assert stats["initialize"] == 1
        assert stats["tools_call"] >= 20


async def test_upstream_down_during_heal_gives_an_error_not_a_hang(
    upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(upstream.url, connect_retry=0.5)
    async with mcp_session(proxy.url) as session:
        assert text_of(await session.call_tool("echo", {"text": "warm"})) == "warm"
        await upstream.stop()
        async with asyncio.timeout(15):
            with pytest.raises(MCPError, match="cannot reach the upstream MCP server: connection refused"):
                await session.call_tool("echo", {"text": "lost"})
        # The upstream comes back: the same client session heals and goes on.
        await upstream.start()
        async with asyncio.timeout(15):
            assert text_of(await session.call_tool("echo", {"text": "back"})) == "back"


async def test_tool_call_survives_idle_ttl_expiry(start_proxy: ProxyFactory) -> None:
    upstream = UpstreamProcess(json_response=False, idle_timeout=1.0)
    await upstream.start()
    try:
        proxy = await start_proxy(upstream.url)
        async with aiohttp.ClientSession() as http:
            client_session_id = await raw_initialize(http, proxy.url)
            record = await proxy.record(client_session_id)
            assert record is not None
            upstream_session_id = record.upstream_session_id

            async def expired() -> bool:
                return upstream_session_id not in await upstream.live_sessions()

            assert not await expired()
            await wait_until(expired, 10, "upstream idle expiry")
            body = {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "x"}},
            }
            async with http.post(proxy.url, json=body, headers=session_headers(client_session_id)) as response:
                assert response.status == 200
                assert response.headers["Mcp-Session-Id"] == client_session_id
                assert '"id":7' in (await response.text()).replace(" ", "")
        healed = await proxy.record(client_session_id)
        assert healed is not None
        assert healed.generation == 1
        assert healed.upstream_session_id != record.upstream_session_id
    finally:
        await upstream.stop()


async def test_a_restart_gap_is_bridged_without_an_error(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory
) -> None:
    proxy = await start_proxy(sse_upstream.url, connect_retry=30)
    async with mcp_session(proxy.url) as session, asyncio.TaskGroup() as tasks:
        assert text_of(await session.call_tool("echo", {"text": "before"})) == "before"
        await sse_upstream.stop()
        # The call leaves while nothing listens: the proxy keeps knocking until the new process is up.
        during = tasks.create_task(session.call_tool("echo", {"text": "during the restart"}))
        await sse_upstream.start()
        async with asyncio.timeout(30):
            assert text_of(await during) == "during the restart"
