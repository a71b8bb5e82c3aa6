"""``mcp-heal-proxy sessions`` and ``tail`` as a user runs them: real processes, next to a running proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mcp_heal_proxy.watch import events_url, format_event
from tests.conftest import (
    REPO_ROOT,
    ProxyFactory,
    UpstreamProcess,
    echo_call,
    free_port,
    post_on_session,
    raw_initialize,
    session_headers,
    wait_until,
)
from tests.test_store_redis import RedisServer

CLI_TIMEOUT = 30.0


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the command line to completion; its exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_heal_proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        async with asyncio.timeout(CLI_TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@contextlib.asynccontextmanager
async def serving(upstream_url: str, state: str, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """``mcp-heal-proxy serve`` in its own process, stopped by its PID."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_heal_proxy",
        "serve",
        "--upstream",
        upstream_url,
        "--port",
        str(port),
        "--state",
        state,
        "--log-format",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            banner = await process.stdout.readline()
        assert b"mcp-heal-proxy" in banner, banner
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_sessions_reads_a_sqlite_store_while_the_proxy_runs(
    sse_upstream: UpstreamProcess, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    state = str(tmp_path / "sessions.db")
    port = free_port()
    async with serving(sse_upstream.url, state, port):
        session_id = await raw_initialize(http, f"http://127.0.0.1:{port}/mcp")
        subscribe = {"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel", "params": {"level": "warning"}}
        async with http.post(f"http://127.0.0.1:{port}/mcp", json=subscribe, headers=session_headers(session_id)) as r:
            assert r.status == 200
            await r.read()
        status, stdout, stderr = await run_cli("sessions", "--state", state, "--json")
        assert status == 0, stderr
        (row,) = json.loads(stdout)
        assert row["id"] == session_id, "the store's owner sees full ids"
        assert (row["client"], row["client_version"], row["protocol_version"]) == ("raw-test-client", "1", "2025-11-25")
        assert row["log_level"] == "warning"
        assert row["heals"] == 0
        status, stdout, stderr = await run_cli("sessions", "--state", state)
        assert status == 0, stderr
        header, line = stdout.splitlines()
        assert header.split()[:3] == ["SESSION", "UPSTREAM", "CLIENT"]
        assert line.startswith(session_id[:8])
        assert "raw-test-client 1" in line
        assert session_id not in stdout, "the table shows short ids"


async def test_sessions_reads_a_redis_store_while_the_proxy_runs(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        proxy = await start_proxy(sse_upstream.url, state=redis.url, connect_retry=10.0)
        first = await raw_initialize(http, proxy.url)
        second = await raw_initialize(http, proxy.url)
        await sse_upstream.restart()
        ping = {"jsonrpc": "2.0", "id": 5, "method": "ping"}
        async with http.post(proxy.url, json=ping, headers=session_headers(second)) as response:
            assert response.status == 200
            await response.read()
        status, stdout, stderr = await run_cli("sessions", "--state", redis.url, "--json")
        assert status == 0, stderr
        rows = json.loads(stdout)
        assert [row["id"] for row in rows] == [second, first], "most recently used first"
        assert [row["heals"] for row in rows] == [1, 0]
        async with http.get(proxy.url.replace("/mcp", "/_proxy/api/sessions")) as response:
            page = await response.json()
        assert page["count"] == 2
        assert {row["id"] for row in page["shown"]} == {first[:8], second[:8]}
    finally:
        await redis.stop()


async def test_forget_goes_through_the_running_proxy_else_deletes_the_record_only(
    sse_upstream: UpstreamProcess, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    state = str(tmp_path / "sessions.db")
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    async with serving(sse_upstream.url, state, port):
        first = await raw_initialize(http, f"{proxy}/mcp")
        second = await raw_initialize(http, f"{proxy}/mcp")
        assert len(await sse_upstream.live_sessions()) == 2
        status, stdout, stderr = await run_cli("sessions", "forget", first[:8], "--state", state, "--proxy", proxy)
        assert status == 0, stderr
        assert f"ended session {first[:8]}" in stdout
        assert "sent DELETE to upstream default (it answered 200)" in stdout
        assert len(await sse_upstream.live_sessions()) == 1
    status, stdout, stderr = await run_cli("sessions", "forget", second[:8], "--state", state, "--proxy", proxy)
    assert status == 0, stderr
    assert "record deleted from the store only (no proxy answers at" in stdout
    assert "the upstream session was not ended" in stdout
    status, stdout, _ = await run_cli("sessions", "--state", state, "--json")
    assert json.loads(stdout) == []
    async with serving(sse_upstream.url, state, port):
        # Forgotten stays forgotten: the sealed id does not bring the session back.
        for forgotten in (first, second):
            status, _, answer = await post_on_session(http, f"{proxy}/mcp", forgotten, echo_call(1))
            assert (status, answer["error"]["message"]) == (404, "Session not found")
    status, _, stderr = await run_cli("sessions", "forget", "ffffffff", "--state", state, "--proxy", proxy)
    assert status == 1
    assert "no session ffffffff" in stderr


async def test_sessions_of_a_missing_store_is_a_one_line_error(tmp_path: Path) -> None:
    status, _, stderr = await run_cli("sessions", "--state", str(tmp_path / "none.db"))
    assert status == 2
    assert "no session store at" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "none.db").exists(), "reading never creates a store"


@contextlib.asynccontextmanager
async def tailing(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_heal_proxy",
        "tail",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_until(stream: asyncio.StreamReader | None, needle: str, timeout: float = 20.0) -> list[str]:
    """Lines from a process's output until one contains ``needle``."""
    assert stream is not None
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"output ended before {needle!r}: {lines}"
            lines.append(line)
            if needle in line:
                return lines


async def tail_connected(http: aiohttp.ClientSession, base: str) -> bool:
    async with http.get(f"{base}/_proxy/api/status") as response:
        count: int = (await response.json())["proxy"]["live_subscribers"]
        return count > 0


async def test_tail_sees_a_heal(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url, connect_retry=10.0)
    base = proxy.url.removesuffix("/mcp")
    async with tailing(base, "--json") as tail:
        await wait_until(lambda: tail_connected(http, base), 20, "tail connected")
        session_id = await raw_initialize(http, proxy.url)
        await sse_upstream.restart()
        ping = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
        async with http.post(proxy.url, json=ping, headers=session_headers(session_id)) as response:
            assert response.status == 200
            await response.read()
        lines = await read_until(tail.stdout, '"type":"heal"')
        heal = json.loads(lines[-1])
        assert (heal["session"], heal["outcome"], heal["reason"]) == (session_id[:8], "healed", "http_404")
        (replayed,) = [json.loads(line) for line in await read_until(tail.stdout, '"healed":true')]
        assert (replayed["method"], replayed["status"]) == ("ping", 200)
        methods = [json.loads(line)["method"] for line in lines if '"type":"request"' in line]
        assert methods[:2] == ["initialize", "notifications/initialized"]


async def test_tail_reconnects_when_the_proxy_restarts(
    sse_upstream: UpstreamProcess, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = str(tmp_path / "sessions.db")
    ping = {"jsonrpc": "2.0", "id": 3, "method": "ping"}
    async with tailing(base) as tail:
        # No proxy yet: it was never reached, so it is not "lost".
        assert "lost" not in "".join(await read_until(tail.stderr, f"cannot reach {base}/_proxy/api/events"))
        async with serving(sse_upstream.url, state, port):
            await read_until(tail.stderr, f"following {base}")
            session_id = await raw_initialize(http, f"{base}/mcp")
            await read_until(tail.stdout, "notifications/initialized")
        # The proxy stopped (SIGTERM); a new one on the same port takes over the store.
        await read_until(tail.stderr, f"{base}/_proxy/api/events closed the feed; reconnecting")
        async with serving(sse_upstream.url, state, port):
            await read_until(tail.stderr, f"reconnected to {base}")
            async with http.post(f"{base}/mcp", json=ping, headers=session_headers(session_id)) as response:
                assert response.status == 200
                await response.read()
            line = (await read_until(tail.stdout, "ping"))[-1]
            assert session_id[:8] in line
            assert "\x1b[" not in line, "no colour when stdout is not a terminal"


async def test_tail_gives_up_on_a_proxy_that_stays_away() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    status, _, stderr = await run_cli("tail", address, "--give-up", "1")
    assert status == 1
    assert stderr.startswith(f"cannot reach {address}/_proxy/api/events (connection refused"), stderr
    assert "gave up after 1 s" in stderr
    assert "lost" not in stderr
    assert "Error" not in stderr, "no class names"
    assert "Traceback" not in stderr


def test_tail_lines_are_coloured_on_a_terminal_only() -> None:
    heal = {"at": 0.0, "upstream": "gh", "session": "abcd1234", "reason": "http_404", "outcome": "healed"}
    heal |= {"duration_ms": 12.5, "generation": 2, "error": None}
    plain = format_event("heal", heal, color=False)
    assert plain is not None
    assert plain.endswith(f"gh  abcd1234  {'HEAL http_404':32}  healed       12.5 ms  generation 2")
    coloured = format_event("heal", heal, color=True)
    assert coloured is not None
    assert "\x1b[1m\x1b[33mHEAL http_404" in coloured
    request = {"at": 0.0, "upstream": "gh", "session": None, "method": "tools/call", "tool": "echo", "status": 502}
    request |= {"duration_ms": 3.0, "healed": False}
    line = format_event("request", request, color=True)
    assert line is not None
    assert "tools/call echo" in line
    assert "\x1b[31m502" in line


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "http://127.0.0.1:8787/_proxy/api/events"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000/_proxy/api/events"),
        ("http://127.0.0.1:9000/", "http://127.0.0.1:9000/_proxy/api/events"),
        ("http://h:1/_proxy/api/events", "http://h:1/_proxy/api/events"),
    ],
)
def test_tail_finds_the_event_feed_from_the_proxys_address(given: str | None, expected: str) -> None:
    assert events_url(given) == expected


async def test_forget_needs_an_id(tmp_path: Path) -> None:
    status, _, stderr = await run_cli("sessions", "forget", "--state", str(tmp_path / "s.db"))
    assert status == 2
    assert "sessions forget needs a session ID" in stderr


EVIL = "\x1b[2J\x1b]0;owned\x07\r\x08\x9b31mforged"
EVIL_SHOWN = "\\x1b[2J\\x1b]0;owned\\x07\\x0d\\x08\\x9b31mforged"


def _no_control_characters(text: str) -> None:
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in text), repr(text)


async def test_tail_and_sessions_write_a_clients_control_characters_as_text(
    sse_upstream: UpstreamProcess, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    state = str(tmp_path / "sessions.db")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with serving(sse_upstream.url, state, port), tailing(base) as tail:
        await read_until(tail.stderr, f"following {base}")
        initialize = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": f"client{EVIL}", "version": f"1{EVIL}"},
            },
        }
        headers = {"Accept": "application/json, text/event-stream"}
        async with http.post(f"{base}/mcp", json=initialize, headers=headers) as response:
            assert response.status == 200
            session_id = response.headers["Mcp-Session-Id"]
            await response.read()
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": f"tool{EVIL}", "arguments": {}}}
        async with http.post(f"{base}/mcp", json=call, headers=session_headers(session_id)) as response:
            await response.read()
        line = (await read_until(tail.stdout, "tools/call"))[-1]
        _no_control_characters(line)
        assert f"tool{EVIL_SHOWN}"[:24] in line  # the column is 32 wide, the rest follows
        status, stdout, stderr = await run_cli("sessions", "--state", state)
        assert status == 0, stderr
        _no_control_characters(stdout)
        assert f"client{EVIL_SHOWN} 1{EVIL_SHOWN}" in stdout
        status, stdout, stderr = await run_cli("sessions", "--state", state, "--json")
        assert status == 0, stderr
        _no_control_characters(stdout)
        assert json.loads(stdout)[0]["client"] == f"client{EVIL}", "JSON keeps the text, escaped by JSON"


def test_console_log_lines_write_control_characters_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from mcp_heal_proxy.observability import configure_logging

    configure_logging("console", "info", cache=False)
    try:
        structlog.get_logger("t").info("request", method=f"m{EVIL}")
        structlog.get_logger("t").info("flush")  # off the loop each line is written at once
    finally:
        configure_logging("json", "info", cache=False)
    err = capsys.readouterr().err
    assert f"m{EVIL_SHOWN}" in err
    assert "owned\x07" not in err
