"""Codex CLI 0.105.0 (Rust, rmcp client) -> proxy -> Python SDK server, driven offline by a fake model.

Codex 0.105 never re-initializes an MCP session: talking to the server directly, every tool call after
the server restarts fails ("error decoding response body"). Through the proxy, the second tool call's
result must reach the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import UpstreamProcess
from tests.interop.conftest import CODEX_BINARY, NodeEnv, ProxyFactory, missing_prerequisite
from tests.interop.fake_model import (
    FINAL_MESSAGE,
    FIRST_CALL_ID,
    FIRST_TEXT,
    SECOND_CALL_ID,
    SECOND_TEXT,
    FakeModel,
)

pytestmark = pytest.mark.interop

CODEX_TIMEOUT = 90.0
TOOL_TIMEOUT_SEC = 15
MCP_SERVER_NAME = "heal"
PROMPT = "Call the echo tool twice, then say that you are done."


@dataclass(frozen=True)
class CodexRun:
    """What one ``codex exec`` did."""

    returncode: int
    stdout: str
    stderr: str
    model: FakeModel

    def output_of(self, call_id: str) -> str | None:
        """The tool output for ``call_id`` as the model last received it."""
        return self.model.final_outputs().get(call_id)

    def explain(self) -> str:
        """Everything useful when an assertion fails."""
        return (
            f"codex exit {self.returncode}\n--- tool outputs seen by the model: {self.model.final_outputs()}\n"
            f"--- unexpected model-server requests: {self.model.unexpected}\n"
            f"--- stdout:\n{self.stdout[-6000:]}\n--- stderr:\n{self.stderr[-6000:]}"
        )


@pytest.fixture
def codex_binary(node_env: NodeEnv) -> Path:
    """The Codex 0.105.0 binary from the pinned npm package."""
    if not CODEX_BINARY.is_file():
        missing_prerequisite(f"Codex binary missing at {CODEX_BINARY} (only linux-x64 is pinned)")
    return CODEX_BINARY


def codex_config(model_url: str, mcp_url: str) -> str:
    """A private config.toml: the fake model as provider, the MCP server under test, nothing else."""
    return f"""\
model = "fake-model"
model_provider = "fake"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false

[model_providers.fake]
name = "fake"
base_url = "{model_url}"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 60000

[mcp_servers.{MCP_SERVER_NAME}]
url = "{mcp_url}"
startup_timeout_sec = 20
tool_timeout_sec = {TOOL_TIMEOUT_SEC}
"""


def codex_environment(home: Path) -> dict[str, str]:
    """A minimal environment: private home, no credentials, and no way off the machine.

    Any HTTP request Codex might make to a host other than 127.0.0.1 goes to a proxy address on which
    nothing listens, so a stray request fails at once on loopback instead of leaving the machine.
    """
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home / ".codex"),
        "RUST_LOG": "warn,codex_rmcp_client=debug,rmcp=info",
        "NO_COLOR": "1",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "ALL_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }


@contextlib.asynccontextmanager
async def fake_model(upstream: UpstreamProcess) -> AsyncIterator[FakeModel]:
    """The scripted model, restarting ``upstream`` between the two tool calls."""
    model = FakeModel(between_calls=upstream.restart)
    await model.start()
    try:
        yield model
    finally:
        await model.close()


async def run_codex(binary: Path, home: Path, model: FakeModel, mcp_url: str) -> CodexRun:
    """``codex exec --json`` with a private CODEX_HOME; bounded by CODEX_TIMEOUT."""
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(codex_config(model.base_url, mcp_url))
    workdir = home / "work"
    workdir.mkdir()
    process = await asyncio.create_subprocess_exec(
        str(binary),
        "exec",
        "--json",
        "--skip-git-repo-check",
        "-C",
        str(workdir),
        PROMPT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=codex_environment(home),
    )
    try:
        async with asyncio.timeout(CODEX_TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    assert process.returncode is not None
    return CodexRun(process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"), model)


def mcp_tool_items(stdout: str) -> list[dict[str, object]]:
    """The completed MCP tool call items of ``codex exec --json``."""
    items: list[dict[str, object]] = []
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            item = event.get("item") if isinstance(event, dict) else None
            if event.get("type") == "item.completed" and isinstance(item, dict) and item.get("type") == "mcp_tool_call":
                items.append(item)
    return items


async def test_codex_second_tool_call_reaches_model_through_proxy(
    codex_binary: Path, sse_upstream: UpstreamProcess, proxy_process: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_process(sse_upstream.url)
    async with fake_model(sse_upstream) as model:
        run = await run_codex(codex_binary, tmp_path / "home", model, proxy.url)
    assert model.restarted, run.explain()
    first = run.output_of(FIRST_CALL_ID)
    assert first is not None, run.explain()
    assert FIRST_TEXT in first, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT in second, run.explain() + "\n--- proxy log:\n" + proxy.log()[-6000:]
    assert FINAL_MESSAGE in run.stdout, run.explain()
    assert run.returncode == 0, run.explain()
    assert [item["status"] for item in mcp_tool_items(run.stdout)] == ["completed", "completed"], run.explain()
    assert '"event": "session.healed"' in proxy.log()


async def test_codex_second_tool_call_fails_without_proxy(
    codex_binary: Path, sse_upstream: UpstreamProcess, tmp_path: Path
) -> None:
    async with fake_model(sse_upstream) as model:
        run = await run_codex(codex_binary, tmp_path / "home", model, sse_upstream.url)
    assert model.restarted, run.explain()
    first = run.output_of(FIRST_CALL_ID)
    assert first is not None, run.explain()
    assert FIRST_TEXT in first, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    # The original bug report's symptom: rmcp keeps the dead session id and cannot read the answer.
    assert SECOND_TEXT not in second, run.explain()
    assert "error decoding response body" in second, run.explain()
    assert [item["status"] for item in mcp_tool_items(run.stdout)] == ["completed", "failed"], run.explain()
