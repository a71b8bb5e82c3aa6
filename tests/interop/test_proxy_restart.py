"""Proxy restart: the proxy process crashes (SIGKILL) and starts again (same port, same session store
file) between two tool calls of one client session, while the upstream keeps running.

The restarted proxy must still know the client's session id (durable session store); the upstream session
behind it is still alive. A proxy that keeps its sessions in memory (``--state :memory:``) has lost the
id's record, but the id is sealed (engine/sealing.py) with the key both processes read from session.key:
the session is re-created from the id and healed with one re-initialize. (Before sealed ids it answered
404, and none of these clients re-initializes.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent

from tests.conftest import UpstreamProcess, mcp_session
from tests.interop.clients import run_codex, run_ts_client
from tests.interop.conftest import NodeEnv, ProxyFactory
from tests.interop.fake_model import SECOND_CALL_ID, SECOND_TEXT

pytestmark = pytest.mark.interop

CALL_TIMEOUT = 30.0
STATE = pytest.mark.parametrize("durable", [True, False], ids=["durable-state", "memory-state"])


@STATE
async def test_python_client_across_proxy_restart(
    sse_upstream: UpstreamProcess, proxy_process: ProxyFactory, durable: bool
) -> None:
    proxy = await proxy_process(sse_upstream.url, memory_state=not durable)
    async with mcp_session(proxy.url) as session, asyncio.timeout(CALL_TIMEOUT):
        first = await session.call_tool("echo", {"text": "before"})
        assert isinstance(first.content[0], TextContent)
        await proxy.restart()
        try:
            second = await session.call_tool("echo", {"text": "after"})
        except MCPError as exc:
            outcome = f"error: {exc}"
        else:
            assert isinstance(second.content[0], TextContent)
            outcome = second.content[0].text
    assert outcome == "after", proxy.log()
    if durable:
        assert (await sse_upstream.stats())["initialize"] == 1, "the upstream session survived: no re-initialize"
    else:
        assert (await sse_upstream.stats())["initialize"] == 2, "the session was restored: one re-initialize"


@STATE
async def test_ts_client_across_proxy_restart(
    node_env: NodeEnv, sse_upstream: UpstreamProcess, proxy_process: ProxyFactory, durable: bool
) -> None:
    proxy = await proxy_process(sse_upstream.url, memory_state=not durable)
    run = await run_ts_client(node_env, proxy.url, proxy.restart)
    assert run.text("first") == "before", run
    assert run.text("second") == "after", (run, proxy.log())
    assert run.returncode == 0, run


@STATE
async def test_codex_across_proxy_restart(
    codex_binary: Path, sse_upstream: UpstreamProcess, proxy_process: ProxyFactory, tmp_path: Path, durable: bool
) -> None:
    proxy = await proxy_process(sse_upstream.url, memory_state=not durable)
    run = await run_codex(codex_binary, tmp_path / "home", proxy.url, proxy.restart)
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT in second, run.explain() + "\n--- proxy log:\n" + proxy.log()[-6000:]
    assert run.tool_statuses() == ["completed", "completed"], run.explain()
