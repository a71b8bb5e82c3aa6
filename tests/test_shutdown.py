"""SIGTERM with streams open: new requests refused, open streams given a grace period, store flushed, exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from mcp_heal_proxy.config import single_upstream
from mcp_heal_proxy.front.app import STORE_KEY, build_app
from mcp_heal_proxy.store.sqlite import SQLiteSessionStore
from mcp_heal_proxy.upstream.client import Upstream
from tests.conftest import UpstreamProcess, raw_initialize, session_headers, start_serve
from tests.fake_upstream import FakeUpstream


async def test_sigterm_refuses_new_requests_lets_calls_finish_and_flushes_the_store(
    tmp_path: Path, sse_upstream: UpstreamProcess
) -> None:
    state = tmp_path / "sessions.db"
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\nshutdown_grace = 5\nstate = "{state}"\nport = 0\n[upstreams.up]\nurl = "{sse_upstream.url}"\npath = "/mcp"\n'
    )
    process, url = await start_serve("--config", str(config), stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as http:
            session_id = await raw_initialize(http, url)
            get_headers = {**session_headers(session_id), "Accept": "text/event-stream"}
            call = {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "tools/call",
                "params": {"name": "gated_steps", "arguments": {"steps": 1}, "_meta": {"progressToken": 1}},
            }
            async with (
                http.get(url, headers=get_headers) as server_stream,
                http.post(url, json=call, headers=session_headers(session_id)) as tool_call,
            ):
                assert server_stream.status == 200
                async with asyncio.timeout(10):
                    await tool_call.content.readuntil(b"notifications/progress")
                os.kill(process.pid, signal.SIGTERM)
                # New connections are refused while open streams are still being served.
                parts = urlsplit(url)
                async with asyncio.timeout(5):
                    while True:
                        try:
                            _, writer = await asyncio.open_connection(parts.hostname, parts.port)
                        except (ConnectionRefusedError, ConnectionResetError):
                            break
                        writer.close()
                        await asyncio.sleep(0.02)
                # The GET stream (server-initiated messages, never finishes by itself) ends cleanly at once.
                async with asyncio.timeout(5):
                    await server_stream.content.read()
                # The tool call in flight gets the grace period to finish, and its answer arrives.
                await sse_upstream.release(1)
                async with asyncio.timeout(10):
                    assert b"done after 1 steps" in await tool_call.content.read()
            async with asyncio.timeout(10):
                assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    assert b"Traceback" not in await process.stderr.read()
    store = SQLiteSessionStore(str(state))
    await store.open()
    try:
        assert await store.get(session_id) is not None
    finally:
        await store.close()


async def test_a_failing_teardown_does_not_skip_closing_the_store(
    fake: tuple[FakeUpstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = fake

    async def broken_close(self: Upstream) -> None:
        raise RuntimeError("closing the upstream failed")

    monkeypatch.setattr(Upstream, "close", broken_close)
    app = build_app(single_upstream(url, state=str(tmp_path / "sessions.db")))
    runner = web.AppRunner(app)
    await runner.setup()
    store = app[STORE_KEY]
    assert isinstance(store, SQLiteSessionStore)
    with pytest.raises(RuntimeError, match="closing the upstream failed"):
        await runner.cleanup()
    assert store._connection is None, "the store was left open"


async def test_sigterm_with_a_call_that_never_finishes_exits_after_one_grace_period(
    tmp_path: Path, sse_upstream: UpstreamProcess
) -> None:
    """shutdown_grace bounds the whole stop: `docker stop` (10 s) must not SIGKILL a proxy whose grace is 10 s.

    aiohttp waits for a running handler twice, each time for shutdown_timeout: before and after it
    cancels the request's body. Given shutdown_grace whole, a call that never finished took twice that.
    """
    grace = 4.0
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\nshutdown_grace = {grace}\nstate = ":memory:"\nport = 0\n[upstreams.up]\nurl = "{sse_upstream.url}"\npath = "/mcp"\n'
    )
    process, url = await start_serve("--config", str(config), stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as http:
            session_id = await raw_initialize(http, url)
            call = {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "tools/call",
                "params": {"name": "gated_steps", "arguments": {"steps": 1}, "_meta": {"progressToken": 1}},
            }
            # The upstream holds the call until released, which this test never does.
            async with http.post(url, json=call, headers=session_headers(session_id)) as tool_call:
                async with asyncio.timeout(10):
                    await tool_call.content.readuntil(b"notifications/progress")
                stopping = asyncio.get_running_loop().time()
                os.kill(process.pid, signal.SIGTERM)
                async with asyncio.timeout(4 * grace):
                    assert await process.wait() == 0
                elapsed = asyncio.get_running_loop().time() - stopping
        assert grace - 0.5 < elapsed < 1.5 * grace, f"stopped {elapsed:.1f} s after SIGTERM, grace {grace} s"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_ctrl_c_during_a_call_says_what_it_waits_for_and_a_second_ctrl_c_stops_at_once(
    tmp_path: Path, sse_upstream: UpstreamProcess
) -> None:
    grace = 30.0  # far longer than the test waits: only the second Ctrl-C can end it in time
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\nshutdown_grace = {grace}\nstate = ":memory:"\nport = 0\nlog_format = "json"\n'
        f'[upstreams.up]\nurl = "{sse_upstream.url}"\npath = "/mcp"\n'
    )
    process, url = await start_serve("--config", str(config), stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    try:
        async with aiohttp.ClientSession() as http:
            session_id = await raw_initialize(http, url)
            call = {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "tools/call",
                "params": {"name": "gated_steps", "arguments": {"steps": 1}, "_meta": {"progressToken": 1}},
            }
            async with http.post(url, json=call, headers=session_headers(session_id)) as tool_call:
                async with asyncio.timeout(10):
                    await tool_call.content.readuntil(b"notifications/progress")
                os.kill(process.pid, signal.SIGINT)
                lines: list[str] = []
                async with asyncio.timeout(10):
                    while not any("Ctrl-C again" in line for line in lines):
                        lines.append((await process.stderr.readline()).decode())
                assert any(f"waiting up to {grace:g} s for 1 call in flight" in line for line in lines), lines
                os.kill(process.pid, signal.SIGINT)
                async with asyncio.timeout(5):
                    assert await process.wait() == 0
        rest = (await process.stderr.read()).decode()
        records = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
        (ended,) = [r for r in records if r.get("event") == "request" and r.get("method") == "tools/call"]
        assert ended["ended_by_proxy"] is True
        assert ended["client_left"] is False
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
