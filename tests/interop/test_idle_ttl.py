"""Idle TTL: the upstream forgets a session that was quiet for a while (tests/interop/ttl_server.py).

Each client makes a tool call, waits until the server has expired its session (the server counts
expiries, so the wait is an observation, not a sleep), and calls again on the same client session.
Through the proxy the second call succeeds; directly it fails.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent

from tests.conftest import mcp_session
from tests.interop.clients import run_codex, run_ts_client
from tests.interop.conftest import NodeEnv, ProxyFactory, TtlServer
from tests.interop.fake_model import SECOND_CALL_ID, SECOND_TEXT

pytestmark = pytest.mark.interop

CALL_TIMEOUT = 20.0


async def python_echo_twice(url: str, ttl_server: TtlServer) -> str:
    """Python SDK client: echo, wait for the idle expiry, echo again; the second call's text or error."""
    async with mcp_session(url) as session, asyncio.timeout(CALL_TIMEOUT + ttl_server.idle_timeout * 5 + 5):
        first = await session.call_tool("echo", {"text": "before"})
        assert isinstance(first.content[0], TextContent)
        assert first.content[0].text == "before"
        await ttl_server.wait_for_expiry()
        try:
            second = await session.call_tool("echo", {"text": "after"})
        except MCPError as exc:
            return f"error: {exc}"
        assert isinstance(second.content[0], TextContent)
        return second.content[0].text


async def test_python_client_survives_idle_ttl_through_proxy(
    ttl_server: TtlServer, proxy_process: ProxyFactory
) -> None:
    proxy = await proxy_process(ttl_server.url)
    assert await python_echo_twice(proxy.url, ttl_server) == "after", proxy.log()
    assert proxy.healed_on("http_404"), proxy.log()


async def test_python_client_fails_after_idle_ttl_without_proxy(ttl_server: TtlServer) -> None:
    assert await python_echo_twice(ttl_server.url, ttl_server) == "error: Session not found"


async def test_ts_client_survives_idle_ttl_through_proxy(
    node_env: NodeEnv, ttl_server: TtlServer, proxy_process: ProxyFactory
) -> None:
    proxy = await proxy_process(ttl_server.url)
    run = await run_ts_client(node_env, proxy.url, ttl_server.wait_for_expiry)
    assert run.text("first") == "before", run
    assert run.text("second") == "after", (run, proxy.log())
    assert run.returncode == 0, run


async def test_ts_client_fails_after_idle_ttl_without_proxy(node_env: NodeEnv, ttl_server: TtlServer) -> None:
    run = await run_ts_client(node_env, ttl_server.url, ttl_server.wait_for_expiry)
    assert run.text("first") == "before", run
    error = run.error("second")
    assert error is not None, run
    assert "Session not found" in error, run


async def test_codex_survives_idle_ttl_through_proxy(
    codex_binary: Path, ttl_server: TtlServer, proxy_process: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_process(ttl_server.url)
    run = await run_codex(codex_binary, tmp_path / "home", proxy.url, ttl_server.wait_for_expiry)
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT in second, run.explain() + "\n--- proxy log:\n" + proxy.log()[-6000:]
    assert run.tool_statuses() == ["completed", "completed"], run.explain()


async def test_codex_fails_after_idle_ttl_without_proxy(
    codex_binary: Path, ttl_server: TtlServer, tmp_path: Path
) -> None:
    run = await run_codex(codex_binary, tmp_path / "home", ttl_server.url, ttl_server.wait_for_expiry)
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT not in second, run.explain()
    assert "error decoding response body" in second, run.explain()
    assert run.tool_statuses() == ["completed", "failed"], run.explain()
