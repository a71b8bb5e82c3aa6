"""The command line as a user meets it: a real process, its output, its exit status."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import REPO_ROOT


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_heal_proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )


@pytest.fixture
async def serving() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process = await start_cli("serve", "--upstream", "http://127.0.0.1:9/mcp", "--port", "0", "--log-format", "json")
    assert process.stdout is not None
    try:
        async with asyncio.timeout(20):
            banner = b"".join([await process.stdout.readline() for _ in range(3)])
        match = re.search(rb'url = "(http://127\.0\.0\.1:\d+/mcp)"', banner)
        assert match, banner
        yield process, match.group(1).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_prints_the_url_to_paste_and_answers_healthz(
    serving: tuple[asyncio.subprocess.Process, str],
) -> None:
    _, url = serving
    assert url.startswith("http://127.0.0.1:"), "no --host given: the default bind is loopback"
    async with aiohttp.ClientSession() as http, http.get(url.replace("/mcp", "/healthz")) as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serve_stops_cleanly_on_signals(
    serving: tuple[asyncio.subprocess.Process, str], signum: signal.Signals
) -> None:
    process, _ = serving
    os.kill(process.pid, signum)
    async with asyncio.timeout(20):
        assert await process.wait() == 0
    assert process.stderr is not None
    stderr = await process.stderr.read()
    assert b"Traceback" not in stderr
    assert b"proxy.stopping" in stderr


async def test_busy_port_is_a_one_line_error_with_exit_status_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = await start_cli("serve", "--upstream", "http://127.0.0.1:9/mcp", "--port", str(port))
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"address already in use" in stderr
    assert b"Traceback" not in stderr


@pytest.mark.parametrize("upstream", ["not-a-url", "ftp://example.invalid/mcp"])
async def test_a_bad_upstream_url_is_refused_with_exit_status_2(upstream: str) -> None:
    process = await start_cli("serve", "--upstream", upstream)
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"not an http(s) URL" in stderr


async def test_help_shows_examples() -> None:
    process = await start_cli("serve", "--help")
    async with asyncio.timeout(20):
        stdout, _ = await process.communicate()
    assert process.returncode == 0
    assert b"examples:" in stdout
    assert b"mcp-heal-proxy serve --upstream" in stdout
    assert b'url = "http://127.0.0.1:8787/mcp"' in stdout


async def test_binding_beyond_localhost_without_a_token_logs_a_warning() -> None:
    # 127.0.0.2 is still loopback (nothing leaves the machine) but not one of the local names.
    process = await start_cli(
        "serve", "--upstream", "http://127.0.0.1:9/mcp", "--host", "127.0.0.2", "--port", "0", "--log-format", "json"
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            while b"proxy.exposed_without_token" not in (line := await process.stderr.readline()):
                assert line, "the proxy exited without the warning"
    finally:
        process.kill()
        await process.wait()


async def test_an_unusable_state_path_is_a_one_line_error_with_exit_status_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    process = await start_cli("serve", "--upstream", "http://127.0.0.1:9/mcp", "--state", str(blocker / "sessions.db"))
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"cannot open the session store" in stderr
    assert b"Traceback" not in stderr
