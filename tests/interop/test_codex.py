"""Codex CLI 0.105.0 (Rust, rmcp client) -> proxy -> Python SDK server / server-everything, offline.

Codex is driven by a fake model (tests/interop/fake_model.py) that asks for the MCP tool twice; the
harness restarts the upstream in between. Codex 0.105 never re-initializes an MCP session: talking to
the server directly, the second call fails ("error decoding response body", the original bug report).
Through the proxy, the second tool call's result must reach the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import UpstreamProcess
from tests.interop.clients import run_codex
from tests.interop.conftest import EverythingServer, ProxyFactory
from tests.interop.fake_model import FINAL_MESSAGE, FIRST_CALL_ID, FIRST_TEXT, SECOND_CALL_ID, SECOND_TEXT

pytestmark = pytest.mark.interop


async def test_codex_second_tool_call_reaches_model_through_proxy(
    codex_binary: Path, sse_upstream: UpstreamProcess, proxy_process: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_process(sse_upstream.url)
    run = await run_codex(codex_binary, tmp_path / "home", proxy.url, sse_upstream.restart)
    assert run.model.restarted, run.explain()
    first = run.output_of(FIRST_CALL_ID)
    assert first is not None, run.explain()
    assert FIRST_TEXT in first, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT in second, run.explain() + "\n--- proxy log:\n" + proxy.log()[-6000:]
    assert FINAL_MESSAGE in run.stdout, run.explain()
    assert run.returncode == 0, run.explain()
    assert run.tool_statuses() == ["completed", "completed"], run.explain()
    assert proxy.healed_on("http_404"), proxy.log()


async def test_codex_second_tool_call_fails_without_proxy(
    codex_binary: Path, sse_upstream: UpstreamProcess, tmp_path: Path
) -> None:
    run = await run_codex(codex_binary, tmp_path / "home", sse_upstream.url, sse_upstream.restart)
    assert run.model.restarted, run.explain()
    first = run.output_of(FIRST_CALL_ID)
    assert first is not None, run.explain()
    assert FIRST_TEXT in first, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    # The original bug report's symptom: rmcp keeps the dead session id and cannot read the answer.
    assert SECOND_TEXT not in second, run.explain()
    assert "error decoding response body" in second, run.explain()
    assert run.tool_statuses() == ["completed", "failed"], run.explain()


async def test_codex_survives_server_everything_restart_through_proxy(
    codex_binary: Path, everything: EverythingServer, proxy_process: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_process(everything.url)
    run = await run_codex(codex_binary, tmp_path / "home", proxy.url, everything.restart, argument="message")
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert f"Echo: {SECOND_TEXT}" in second, run.explain() + "\n--- proxy log:\n" + proxy.log()[-6000:]
    assert run.tool_statuses() == ["completed", "completed"], run.explain()
    assert proxy.healed_on("http_400"), proxy.log()


async def test_codex_fails_after_server_everything_restart_without_proxy(
    codex_binary: Path, everything: EverythingServer, tmp_path: Path
) -> None:
    run = await run_codex(codex_binary, tmp_path / "home", everything.url, everything.restart, argument="message")
    first = run.output_of(FIRST_CALL_ID)
    assert first is not None, run.explain()
    assert f"Echo: {FIRST_TEXT}" in first, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT not in second, run.explain()
    assert "error decoding response body" in second, run.explain()
    assert run.tool_statuses() == ["completed", "failed"], run.explain()
