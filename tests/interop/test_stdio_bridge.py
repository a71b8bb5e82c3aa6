"""Clients that launch their MCP servers as commands: the TypeScript SDK's StdioClientTransport running
``mcp-heal-proxy stdio``, in front of the Python SDK server (404 on a dead session) and server-everything
(400). Each paired with its failing counterpart: mcp-remote 0.15.1, the most used stdio bridge, launched
the same way, which does not heal server-everything's 400.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.conftest import REPO_ROOT, UpstreamProcess
from tests.interop.clients import run_codex, run_ts_client
from tests.interop.conftest import EverythingServer, NodeEnv, TtlServer
from tests.interop.fake_model import SECOND_CALL_ID, SECOND_TEXT

pytestmark = pytest.mark.interop

BRIDGE = str(Path(sys.executable).parent / "mcp-heal-proxy")


@pytest.fixture
def bridge(tmp_path: Path) -> str:
    """The bridge command as clients launch it, running this checkout's code: clients start commands with
    an environment of their own choosing (without PYTHONPATH), in which the venv's command would import
    the installed package, another checkout's code."""
    shim = tmp_path / "bin" / "mcp-heal-proxy"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{BRIDGE}" "$@"\n')
    shim.chmod(0o755)
    return str(shim)


def mcp_remote(node_env: NodeEnv, url: str) -> list[str]:
    """mcp-remote as a client's command (no OAuth: --allow-http for a plain 127.0.0.1 upstream)."""
    return [node_env.node, str(node_env.modules / "mcp-remote" / "dist" / "proxy.js"), url, "--allow-http"]


async def test_ts_stdio_client_survives_an_upstream_restart_through_the_bridge(
    node_env: NodeEnv, upstream: UpstreamProcess, bridge: str
) -> None:
    command = [bridge, "stdio", "--upstream", upstream.url]
    run = await run_ts_client(node_env, upstream.url, upstream.restart, stdio_command=command)
    assert run.text("first") == "before", run
    assert run.text("second") == "after", run
    assert run.returncode == 0, run
    assert (await upstream.stats())["initialize"] == 1, "one heal, one re-initialize"


async def test_ts_stdio_client_survives_server_everything_400_through_the_bridge(
    node_env: NodeEnv, everything: EverythingServer, bridge: str
) -> None:
    command = [bridge, "stdio", "--upstream", everything.url]
    run = await run_ts_client(node_env, everything.url, everything.restart, argument="message", stdio_command=command)
    assert run.text("first") == "Echo: before", run
    assert run.text("second") == "Echo: after", run
    assert run.returncode == 0, run


async def test_ts_stdio_client_fails_on_server_everything_400_through_mcp_remote(
    node_env: NodeEnv, everything: EverythingServer
) -> None:
    run = await run_ts_client(
        node_env,
        everything.url,
        everything.restart,
        argument="message",
        stdio_command=mcp_remote(node_env, everything.url),
    )
    assert run.text("first") == "Echo: before", run
    assert run.text("second") is None, run
    assert run.returncode == 1, run


async def test_codex_launching_the_bridge_survives_an_upstream_restart(
    codex_binary: Path, sse_upstream: UpstreamProcess, tmp_path: Path, bridge: str
) -> None:
    command = [bridge, "stdio", "--upstream", sse_upstream.url]
    run = await run_codex(
        codex_binary, tmp_path / "home", sse_upstream.url, sse_upstream.restart, stdio_command=command
    )
    assert run.model.restarted, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT in second, run.explain()
    assert run.tool_statuses() == ["completed", "completed"], run.explain()


async def test_codex_launching_the_bridge_survives_server_everything_400(
    codex_binary: Path, everything: EverythingServer, tmp_path: Path, bridge: str
) -> None:
    command = [bridge, "stdio", "--upstream", everything.url]
    run = await run_codex(
        codex_binary, tmp_path / "home", everything.url, everything.restart, argument="message", stdio_command=command
    )
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert f"Echo: {SECOND_TEXT}" in second, run.explain()
    assert run.tool_statuses() == ["completed", "completed"], run.explain()


async def test_python_stdio_client_survives_an_idle_ttl_through_the_bridge(ttl_server: TtlServer, bridge: str) -> None:
    params = StdioServerParameters(command=bridge, args=["stdio", "--upstream", ttl_server.url])
    async with (
        stdio_client(params) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream) as session,
        asyncio.timeout(60),
    ):
        await session.initialize()
        first = await session.call_tool("echo", {"text": "before"})
        assert "before" in str(first.content)
        await ttl_server.wait_for_expiry()
        second = await session.call_tool("echo", {"text": "after"})
        assert not second.is_error, second
        assert "after" in str(second.content)
