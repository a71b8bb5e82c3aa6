"""Handshake-era clients from other ecosystems in front of a 2026-07-28-only server (tests/modern_upstream.py),
through the proxy's bridge, over HTTP (``serve``) and the stdio bridge: the TypeScript SDK 1.32.2 client
(tools, progress, logs, an elicitation, list_changed) and Codex 0.105 and 0.169 (two tool calls asked by
the scripted model), across an upstream restart and a proxy restart. Directly, each fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import ModernUpstreamProcess
from tests.interop.clients import ClientRun, run_codex, run_ts_client
from tests.interop.conftest import NODE_MODULES, NodeEnv, ProxyFactory, missing_prerequisite
from tests.interop.fake_model import FINAL_MESSAGE, FIRST_CALL_ID, FIRST_TEXT, SECOND_CALL_ID, SECOND_TEXT

pytestmark = pytest.mark.interop

BRIDGE = str(Path(sys.executable).parent / "mcp-heal-proxy")
CODEX_BINARIES = {
    "0.105": NODE_MODULES / "@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/codex/codex",
    "0.169": NODE_MODULES / "@openai/codex-oauth-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex",
}
# Codex 0.169 asks before running an MCP tool unless told otherwise; `codex exec` cannot ask.
APPROVE_TOOLS = {"0.105": "", "0.169": 'default_tools_approval_mode = "approve"\n'}
ROUND = ("tools", "echo", "progress_and_logs", "elicitation", "list_changed")


def stdio_bridge(url: str) -> list[str]:
    """``mcp-heal-proxy stdio --upstream URL`` as a client launches it. Clients give their commands a small
    environment: a PYTHONPATH the tests run with (the code under test, first) is passed on explicitly."""
    command = [BRIDGE, "stdio", "--upstream", url]
    path = os.environ.get("PYTHONPATH")
    return ["/usr/bin/env", f"PYTHONPATH={path}", *command] if path else command


@pytest.fixture
async def modern() -> AsyncIterator[ModernUpstreamProcess]:
    server = ModernUpstreamProcess()
    await server.start()
    yield server
    await server.stop()


def assert_round(run: ClientRun, name: str) -> None:
    for check in ROUND:
        step = run.steps.get(f"{name}:{check}", {})
        assert step.get("ok"), f"{name}:{check}: {step}\n{run.stderr[-3000:]}"


@pytest.mark.parametrize("transport", ["http", "stdio"])
@pytest.mark.parametrize("restart", ["upstream", "proxy"])
async def test_ts_client_through_the_bridge(
    node_env: NodeEnv, modern: ModernUpstreamProcess, proxy_process: ProxyFactory, transport: str, restart: str
) -> None:
    if transport == "stdio" and restart == "proxy":
        pytest.skip("the stdio bridge is the client's own process: there is no proxy to restart")
    proxy = await proxy_process(modern.url)
    between = modern.restart if restart == "upstream" else proxy.restart
    run = await run_ts_client(
        node_env,
        proxy.url,
        between,
        script="ts_bridge_client.mjs",
        stdio_command=stdio_bridge(modern.url) if transport == "stdio" else None,
    )
    assert_round(run, "before")
    assert_round(run, "after")
    assert run.returncode == 0, run.steps
    assert (await modern.stats())["initialize_refused"] <= 1


async def test_ts_client_fails_directly(node_env: NodeEnv, modern: ModernUpstreamProcess) -> None:
    async def nothing() -> None:
        return None

    run = await run_ts_client(node_env, modern.url, nothing, script="ts_bridge_client.mjs")
    assert run.returncode != 0
    assert "setup" in run.steps, run.steps
    assert "400" in str(run.steps["setup"].get("error")) or "-32022" in str(run.steps["setup"]), run.steps


@pytest.fixture(params=sorted(CODEX_BINARIES))
def codex(request: pytest.FixtureRequest, node_env: NodeEnv) -> tuple[str, Path]:
    version: str = request.param
    binary = CODEX_BINARIES[version]
    if not binary.is_file():
        missing_prerequisite(f"Codex {version} binary missing at {binary} (only linux-x64 is pinned)")
    return version, binary


@pytest.mark.parametrize("transport", ["url", "command"])
@pytest.mark.parametrize("restart", ["upstream", "proxy"])
async def test_codex_through_the_bridge(
    codex: tuple[str, Path],
    modern: ModernUpstreamProcess,
    proxy_process: ProxyFactory,
    tmp_path: Path,
    transport: str,
    restart: str,
) -> None:
    """Codex lists the tools and calls echo twice, the upstream or the proxy restarted in between."""
    version, binary = codex
    if transport == "command" and restart == "proxy":
        pytest.skip("the stdio bridge is Codex's own child: there is no proxy to restart")
    proxy = await proxy_process(modern.url)
    run = await run_codex(
        binary,
        tmp_path / "home",
        proxy.url,
        modern.restart if restart == "upstream" else proxy.restart,
        server_config=APPROVE_TOOLS[version],
        stdio_command=stdio_bridge(modern.url) if transport == "command" else None,
    )
    assert run.model.restarted, run.explain()
    first = run.output_of(FIRST_CALL_ID)
    assert first is not None, run.explain()
    assert FIRST_TEXT in first, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT in second, run.explain() + "\n--- proxy log:\n" + proxy.log()[-6000:]
    assert FINAL_MESSAGE in run.stdout, run.explain()
    assert run.tool_statuses() == ["completed", "completed"], run.explain()
    # Each call reached the upstream once (its counts start again when it restarts).
    assert (await modern.stats())["tools_call"] == (1 if restart == "upstream" else 2)


async def test_codex_fails_directly(codex: tuple[str, Path], modern: ModernUpstreamProcess, tmp_path: Path) -> None:
    """Directly, Codex's initialize is refused (-32022): no tools reach the model, no call reaches the
    server."""
    version, binary = codex
    run = await run_codex(binary, tmp_path / "home", modern.url, modern.restart, server_config=APPROVE_TOOLS[version])
    assert (await modern.stats())["tools_call"] == 0, run.explain()
    assert run.tool_statuses() != ["completed", "completed"], run.explain()
