"""The stdio bridge, launched as a command by the official SDK client (and by hand, for bad input).

The bridge runs as ``<venv>/bin/mcp-heal-proxy stdio --upstream URL`` with only the environment a
client passes to the commands it launches (the SDK's default: HOME, PATH, USER and the like).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client
from mcp.shared.exceptions import MCPError

from tests.conftest import REPO_ROOT, UpstreamProcess, mcp_session, wait_until
from tests.fake_upstream import FakeUpstream, hang_forever

BRIDGE = str(Path(sys.executable).parent / "mcp-heal-proxy")
CALL_TIMEOUT = 20.0
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def checkout_pythonpath() -> str:
    """PYTHONPATH for a bridge process: this checkout's code first. The bridge command belongs to the
    venv, whose installed package may be another checkout (an editable install of the main one, in the
    middle of a merge or an edit): without this, a worktree's tests would run that code instead."""
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def bridge_parameters(url: str) -> StdioServerParameters:
    """How the SDK client launches the bridge: with the SDK's default environment (HOME, PATH, USER and
    the like), plus this checkout's code on PYTHONPATH."""
    return StdioServerParameters(
        command=BRIDGE, args=["stdio", "--upstream", url], env={"PYTHONPATH": checkout_pythonpath()}
    )


@contextlib.asynccontextmanager
async def bridged_session(url: str, **callbacks: Any) -> AsyncIterator[ClientSession]:
    """The SDK client launching the bridge as its MCP server command."""
    params = bridge_parameters(url)
    async with (
        stdio_client(params) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream, **callbacks) as session,
    ):
        async with asyncio.timeout(CALL_TIMEOUT):
            await session.initialize()
        yield session


async def echo(session: ClientSession, text: str) -> str:
    async with asyncio.timeout(CALL_TIMEOUT):
        result = await session.call_tool("echo", {"text": text})
    assert not result.is_error, result
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return content.text


def test_the_bridge_the_sdk_client_launches_runs_this_checkouts_code(tmp_path: Path) -> None:
    # What the SDK gives the process it launches (stdio_client): its default environment, then params.env.
    # The bridge is a console script: the directory it runs in is not on its path (hence cwd elsewhere).
    params = bridge_parameters("http://127.0.0.1:1/mcp")
    env = get_default_environment() | (params.env or {})
    where = subprocess.run(
        [sys.executable, "-c", "import mcp_heal_proxy; print(mcp_heal_proxy.__file__)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True, timeout=CALL_TIMEOUT,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(REPO_ROOT), f"the bridge would run {where}, not this checkout's code"


async def test_the_sdk_client_keeps_its_session_across_an_upstream_restart(upstream: UpstreamProcess) -> None:
    async with bridged_session(upstream.url) as session:
        assert await echo(session, "before") == "before"
        await upstream.restart()
        assert await echo(session, "after") == "after"
    assert (await upstream.stats())["initialize"] == 1, "one heal: one re-initialize on the new upstream"


async def test_without_the_bridge_the_same_client_fails_after_the_restart(upstream: UpstreamProcess) -> None:
    async with mcp_session(upstream.url) as session:
        assert await echo(session, "before") == "before"
        await upstream.restart()
        with pytest.raises(MCPError, match="Session not found"):
            await echo(session, "after")


async def test_progress_arrives_while_the_tool_still_runs(sse_upstream: UpstreamProcess) -> None:
    seen: list[float] = []
    first = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)
        first.set()

    async with bridged_session(sse_upstream.url) as session:
        async with asyncio.TaskGroup() as group:
            call = group.create_task(
                session.call_tool("gated_steps", {"steps": 2}, progress_callback=on_progress, read_timeout_seconds=30)
            )
            async with asyncio.timeout(CALL_TIMEOUT):
                await first.wait()  # step 1's progress came while the tool is blocked on step 1
            assert not call.done()
            await sse_upstream.release(1)
            await wait_until(lambda: len(seen) == 2, CALL_TIMEOUT, "step 2's progress")
            await sse_upstream.release(2)
        result = call.result()
    assert seen == [1, 2]
    assert "done after 2 steps" in str(result.content)


async def test_an_elicitation_from_the_server_is_answered_by_the_client(sse_upstream: UpstreamProcess) -> None:
    asked: list[str] = []

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async with bridged_session(sse_upstream.url, elicitation_callback=elicit) as session:
        async with asyncio.timeout(CALL_TIMEOUT):
            result = await session.call_tool("ask_name", {})
    assert asked == ["What is your name?"]
    assert "hello Ada" in str(result.content)


# --- by hand: the wire, bad input, the end --------------------------------------------------------------


class RawBridge:
    """The bridge as a process this test writes lines to and reads lines from."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def send(self, message: object) -> None:
        await self.send_raw(json.dumps(message).encode() + b"\n")

    async def send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        await self.process.stdin.drain()

    async def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(CALL_TIMEOUT):
            line = await self.process.stdout.readline()
        assert line.endswith(b"\n"), line
        message: dict[str, Any] = json.loads(line)
        return message

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        async with asyncio.timeout(CALL_TIMEOUT):
            return (await self.process.stderr.read()).decode()

    async def wait(self) -> int:
        async with asyncio.timeout(CALL_TIMEOUT):
            return await self.process.wait()


@contextlib.asynccontextmanager
async def raw_bridge(url: str, *extra: str) -> AsyncIterator[RawBridge]:
    async with bridge_process("--upstream", url, *extra) as bridge:
        yield bridge


@contextlib.asynccontextmanager
async def bridge_process(*args: str) -> AsyncIterator[RawBridge]:
    """``mcp-heal-proxy stdio ARGS`` with the environment a client gives the commands it launches."""
    # And this checkout's code, not the installed one (see checkout_pythonpath).
    names = ("HOME", "PATH", "USER", "LANG")
    env = {key: os.environ[key] for key in names if key in os.environ} | {"PYTHONPATH": checkout_pythonpath()}
    process = await asyncio.create_subprocess_exec(
        BRIDGE,
        "stdio",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        limit=16 * 1024 * 1024,
    )
    try:
        yield RawBridge(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def initialized(bridge: RawBridge) -> None:
    await bridge.send(INITIALIZE)
    answer = await bridge.receive()
    assert answer["id"] == 1
    assert answer["result"]["protocolVersion"] == "2025-11-25"
    await bridge.send(INITIALIZED)


def ping(request_id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "ping"}


async def test_bad_input_gets_an_error_or_a_log_line_and_the_bridge_goes_on(sse_upstream: UpstreamProcess) -> None:
    async with raw_bridge(sse_upstream.url) as bridge:
        await initialized(bridge)
        await bridge.send_raw(b"this is not json\n")
        await bridge.send([ping(5), ping(6)])  # a batch: not part of the stdio transport
        assert [(await bridge.receive())["id"] for _ in range(2)] == [5, 6]
        await bridge.send({"jsonrpc": "2.0", "id": 7, "method": 42})
        refused = await bridge.receive()
        assert refused["id"] == 7
        assert refused["error"]["code"] == -32600
        await bridge.send_raw(
            b'{"jsonrpc":"2.0","id":8,"method":"ping","params":{"pad":"' + b"x" * (5 << 20) + b'"}}\n'
        )
        await bridge.send(ping(9))
        assert await bridge.receive() == {"jsonrpc": "2.0", "id": 9, "result": {}}, "the bridge went on"
        await bridge.send_raw(b'{"jsonrpc":"2.0","id":10,"meth')  # EOF mid-line
        assert bridge.process.stdin is not None
        bridge.process.stdin.close()
        assert await bridge.wait() == 0
        log = await bridge.stderr()
    assert "stdio.bad_message" in log
    assert "stdio.line_too_long" in log
    assert "stdio.incomplete_line_at_eof" in log


async def test_stdout_carries_protocol_messages_only_from_the_first_byte(sse_upstream: UpstreamProcess) -> None:
    async with raw_bridge(sse_upstream.url, "--log-level", "debug") as bridge:
        await initialized(bridge)
        await bridge.send(ping(2))
        assert (await bridge.receive())["id"] == 2
        assert bridge.process.stdin is not None
        bridge.process.stdin.close()
        assert await bridge.wait() == 0
        assert bridge.process.stdout is not None
        assert await bridge.process.stdout.read() == b""


@pytest.mark.parametrize("ending", ["stdin closed", "SIGTERM"])
async def test_a_client_that_leaves_mid_call_ends_the_upstream_session(
    sse_upstream: UpstreamProcess, ending: str
) -> None:
    async with raw_bridge(sse_upstream.url) as bridge:
        await initialized(bridge)
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "gated_steps", "arguments": {"steps": 1}, "_meta": {"progressToken": "p1"}},
        }
        await bridge.send(call)
        progress = await bridge.receive()  # the tool runs, blocked on step 1
        assert progress["method"] == "notifications/progress"
        assert len(await sse_upstream.live_sessions()) == 1
        if ending == "SIGTERM":
            bridge.process.send_signal(signal.SIGTERM)
        else:
            assert bridge.process.stdin is not None
            bridge.process.stdin.close()
        assert await bridge.wait() == 0
    assert await sse_upstream.live_sessions() == [], "the bridge ended its upstream session"


async def test_an_upstream_that_is_down_gets_errors_then_heals_when_it_returns(
    sse_upstream: UpstreamProcess, tmp_path: Path
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'[upstreams.test]\nurl = "{sse_upstream.url}"\nconnect_retry = 0.5\n')
    env = {key: os.environ[key] for key in ("HOME", "PATH") if key in os.environ}
    env["PYTHONPATH"] = checkout_pythonpath()
    process = await asyncio.create_subprocess_exec(
        BRIDGE,
        "stdio",
        "--config",
        str(config),
        "--name",
        "test",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    bridge = RawBridge(process)
    try:
        await initialized(bridge)
        await sse_upstream.stop()
        await bridge.send(ping(2))
        failed = await bridge.receive()
        assert failed["id"] == 2
        assert failed["error"]["message"].startswith("cannot reach the upstream MCP server: connection refused")
        await sse_upstream.start()
        await bridge.send(ping(3))
        assert await bridge.receive() == {"jsonrpc": "2.0", "id": 3, "result": {}}, "healed on the new upstream"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_bad_option_is_one_line_on_stderr_and_nothing_on_stdout() -> None:
    process = await asyncio.create_subprocess_exec(
        BRIDGE, "stdio", "--upstream", "ftp://nowhere", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": checkout_pythonpath()},
    )  # fmt: skip
    async with asyncio.timeout(CALL_TIMEOUT):
        out, err = await process.communicate()
    assert process.returncode == 2
    assert out == b""
    assert err.decode().count("\n") == 1


async def test_an_answer_cut_between_events_is_resumed_by_the_bridge(fake: tuple[FakeUpstream, str]) -> None:
    upstream, url = fake

    async def numbered_then_cut(request: web.Request, body: Any) -> web.StreamResponse | None:
        if body.get("method") != "tools/call":
            return None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}}
        await response.write(f"id: e1\ndata: {json.dumps(progress)}\n\n".encode())
        return response  # ends between events, without the answer: the client side must resume

    async def resume(request: web.Request, body: Any) -> web.StreamResponse | None:
        if request.headers.get("Last-Event-ID") != "e1":
            return None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        answer = {"jsonrpc": "2.0", "id": 2, "result": {"resumed": True}}
        await response.write(f"id: e2\ndata: {json.dumps(answer)}\n\n".encode())
        return response

    upstream.on_request = numbered_then_cut
    upstream.on_get = resume
    async with raw_bridge(url) as bridge:
        await bridge.send(INITIALIZE)
        assert (await bridge.receive())["id"] == 1
        await bridge.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo"}})
        assert (await bridge.receive())["method"] == "notifications/progress"
        assert await bridge.receive() == {"jsonrpc": "2.0", "id": 2, "result": {"resumed": True}}
    assert any(seen.method == "GET" and seen.headers.get("Last-Event-ID") == "e1" for seen in upstream.seen)


async def test_a_heal_the_upstream_never_answers_ends_in_an_error_after_heal_timeout(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    upstream, url = fake
    config = tmp_path / "proxy.toml"
    config.write_text(f'[upstreams.slow]\nurl = "{url}"\nheal_timeout = 1\n')
    async with bridge_process("--config", str(config), "--name", "slow") as bridge:
        await initialized(bridge)
        upstream.forget_all()
        upstream.on_reinitialize = hang_forever
        started = time.monotonic()
        await bridge.send(ping(2))
        answer = await bridge.receive()
        assert time.monotonic() - started < 5.0, "the bridge waited past heal_timeout"
        assert answer["id"] == 2
        assert answer["error"]["message"].startswith("the heal timed out")
