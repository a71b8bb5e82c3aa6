"""Drivers for the non-Python clients of the interop suite: the TypeScript SDK client script and Codex.

Each runs one client session with two ``echo`` tool calls and awaits ``between_calls`` (restart the
upstream, wait out its idle TTL, restart the proxy) between them. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.interop.conftest import HERE, NodeEnv
from tests.interop.fake_model import FakeModel

BetweenCalls = Callable[[], Awaitable[None]]

TS_CLIENT_TIMEOUT = 60.0
CODEX_TIMEOUT = 90.0
CODEX_TOOL_TIMEOUT_SEC = 15
CODEX_MCP_SERVER_NAME = "heal"
CODEX_PROMPT = "Call the echo tool twice, then say that you are done."


# --- TypeScript SDK client ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRun:
    """What the TS client script reported."""

    returncode: int
    steps: dict[str, dict[str, Any]]
    stderr: str

    def text(self, step: str) -> str | None:
        """The tool result text of a step, if it succeeded."""
        value = self.steps.get(step, {}).get("text")
        return value if isinstance(value, str) else None

    def error(self, step: str) -> str | None:
        """The error of a step, if it failed."""
        value = self.steps.get(step, {}).get("error")
        return value if isinstance(value, str) else None


async def run_ts_client(
    node_env: NodeEnv,
    url: str,
    between_calls: BetweenCalls,
    *,
    argument: str = "text",
    stdio_command: list[str] | None = None,
    script: str = "ts_client.mjs",
) -> ClientRun:
    """Run tests/interop/ts_client.mjs (or another ``script`` of the same protocol: JSON lines, "ready",
    one line on stdin) against ``url``; ``argument`` names the echo tool's argument. With
    ``stdio_command`` the client launches that command and speaks stdio to it instead."""
    env = node_env.env()
    if stdio_command is not None:
        env["INTEROP_STDIO_COMMAND"] = json.dumps(stdio_command)
    process = await asyncio.create_subprocess_exec(
        node_env.node,
        str(HERE / script),
        url,
        argument,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    steps: dict[str, dict[str, Any]] = {}
    try:
        async with asyncio.timeout(TS_CLIENT_TIMEOUT):
            while line := await process.stdout.readline():
                record = json.loads(line)
                steps[record["step"]] = record
                if record["step"] == "ready":
                    await between_calls()
                    process.stdin.write(b"go\n")
                    await process.stdin.drain()
            stderr = (await process.stderr.read()).decode(errors="replace")
            returncode = await process.wait()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return ClientRun(returncode, steps, stderr)


# --- Codex ----------------------------------------------------------------------------------------


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

    def tool_statuses(self) -> list[str]:
        """The status of each MCP tool call, from ``codex exec --json``."""
        statuses: list[str] = []
        for line in self.stdout.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if not isinstance(event, dict) or event.get("type") != "item.completed":
                    continue
                item = event.get("item")
                if isinstance(item, dict) and item.get("type") == "mcp_tool_call":
                    statuses.append(str(item.get("status")))
        return statuses

    def explain(self) -> str:
        """Everything useful when an assertion fails."""
        return (
            f"codex exit {self.returncode}\n--- tool outputs seen by the model: {self.model.final_outputs()}\n"
            f"--- unexpected model-server requests: {self.model.unexpected}\n"
            f"--- stdout:\n{self.stdout[-6000:]}\n--- stderr:\n{self.stderr[-6000:]}"
        )


def codex_config(model_url: str, mcp_url: str, server_config: str = "", stdio_command: list[str] | None = None) -> str:
    """A private config.toml: the fake model as provider, the MCP server under test, nothing else.
    With ``stdio_command`` Codex launches that command as the MCP server instead of dialing ``mcp_url``."""
    server = (
        f"command = {json.dumps(stdio_command[0])}\nargs = {json.dumps(stdio_command[1:])}"
        if stdio_command is not None
        else f'url = "{mcp_url}"'
    )
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

[mcp_servers.{CODEX_MCP_SERVER_NAME}]
{server}
startup_timeout_sec = 20
tool_timeout_sec = {CODEX_TOOL_TIMEOUT_SEC}
{server_config}"""


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


async def run_codex(
    binary: Path,
    home: Path,
    mcp_url: str,
    between_calls: BetweenCalls,
    *,
    argument: str = "text",
    extra_config: str = "",
    server_config: str = "",
    stdio_command: list[str] | None = None,
) -> CodexRun:
    """``codex exec --json`` with a private CODEX_HOME and the scripted model; bounded by CODEX_TIMEOUT.

    ``extra_config`` goes at the top of config.toml (e.g. where ``codex mcp login`` kept its tokens),
    ``server_config`` into the MCP server's table.
    """
    model = FakeModel(between_calls, argument=argument)
    await model.start()
    try:
        (home / ".codex").mkdir(parents=True, exist_ok=True)
        (home / ".codex" / "config.toml").write_text(
            extra_config + codex_config(model.base_url, mcp_url, server_config, stdio_command)
        )
        workdir = home / "work"
        workdir.mkdir()
        process = await asyncio.create_subprocess_exec(
            str(binary),
            "exec",
            "--json",
            "--skip-git-repo-check",
            "-C",
            str(workdir),
            CODEX_PROMPT,
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
    finally:
        await model.close()
    assert process.returncode is not None
    return CodexRun(process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"), model)
