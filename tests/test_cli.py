"""The command line as a user meets it: a real process, its output, its exit status."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mcp_heal_proxy.cli import GC_THRESHOLD, banner, tune_garbage_collection
from mcp_heal_proxy.config import build_config
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
    assert b"--upstream must be an http(s) URL" in stderr


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


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """Run one command to its end (bounded): exit status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_heal_proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(20):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def test_port_70000_gets_one_answer_from_the_file_the_variable_and_the_flag_in_check_config_and_serve(
    tmp_path: Path,
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text("[server]\nport = 70000\n[upstreams.a]\nurl = 'http://127.0.0.1:9/mcp'\n")
    upstream = ("--upstream", "http://127.0.0.1:9/mcp")
    attempts = [
        (f"{config}: server.port", ("check-config", str(config)), {}),
        (f"{config}: server.port", ("serve", "--config", str(config)), {}),
        ("--port", ("check-config", *upstream, "--port", "70000"), {}),
        ("--port", ("serve", *upstream, "--port", "70000"), {}),
        ("--set port", ("serve", *upstream, "--set", "port=70000"), {}),
        ("MCP_HEAL_PROXY_PORT", ("check-config", *upstream), {"MCP_HEAL_PROXY_PORT": "70000"}),
        ("MCP_HEAL_PROXY_PORT", ("serve", *upstream), {"MCP_HEAL_PROXY_PORT": "70000"}),
    ]
    for where, args, env in attempts:
        status, _, stderr = await run_cli(*args, env=env)
        assert (status, stderr.decode()) == (
            2,
            f"mcp-heal-proxy: error: {where} must be between 0 and 65535, not 70000\n",
        ), args


async def test_an_upstream_url_with_credentials_is_one_line_in_check_config_and_serve(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text("[upstreams.a]\nurl = 'https://user:hunter2@127.0.0.1:9/mcp'\n")
    for args in (("check-config", str(config)), ("serve", "--config", str(config))):
        status, _, stderr = await run_cli(*args)
        assert status == 2
        assert stderr.count(b"\n") == 1, stderr
        assert b"put them in headers" in stderr
        assert b"hunter2" not in stderr


async def test_a_config_check_config_accepts_at_the_edges_of_every_range_serves_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        "[server]\nport = 0\nstate = ':memory:'\nmax_sessions = 1\nmax_streams_per_session = 1\n"
        "max_body_bytes = 1\nsession_idle_ttl = 1\nkeepalive_interval = 0.1\nshutdown_grace = 0\n"
        "log_format = 'json'\n"
        "[upstreams.a]\nurl = 'http://127.0.0.1:9/mcp'\nconnect_timeout = 0.1\nconnect_retry = 0\n"
        "read_timeout = 0.1\nstream_idle_timeout = 0.1\npool_size = 1\nkeepalive_idle = 0.1\n"
    )
    status, _, stderr = await run_cli("check-config", str(config))
    assert status == 0, stderr
    process = await start_cli("serve", "--config", str(config))
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            banner = b"".join([await process.stdout.readline() for _ in range(3)])
        match = re.search(rb'url = "(http://127\.0\.0\.1:\d+)/a/mcp"', banner)
        assert match, banner
        async with aiohttp.ClientSession() as http, http.get(match.group(1).decode() + "/healthz") as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
        assert process.stderr is not None
        assert b"Traceback" not in await process.stderr.read()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_check_config_applies_the_same_flags_as_serve() -> None:
    status, stdout, stderr = await run_cli(
        "check-config", "--upstream", "http://127.0.0.1:9/mcp", "--port", "9000", "--set", "max_sessions=5"
    )
    assert status == 0, stderr
    shown = json.loads(stdout)
    assert (shown["server"]["port"], shown["server"]["max_sessions"]) == (9000, 5)
    assert shown["upstreams"]["default"]["path"] == "/mcp"


@pytest.mark.parametrize(
    ("host", "listening", "url"),
    [
        ("0.0.0.0", "0.0.0.0:8787 (all interfaces)", "http://127.0.0.1:8787/mcp"),
        ("::", "[::]:8787 (all interfaces)", "http://[::1]:8787/mcp"),
        ("127.0.0.1", "127.0.0.1:8787,", "http://127.0.0.1:8787/mcp"),
        ("192.0.2.7", "192.0.2.7:8787,", "http://192.0.2.7:8787/mcp"),
    ],
)
def test_the_banner_gives_a_url_a_client_can_paste_even_when_listening_on_all_interfaces(
    host: str, listening: str, url: str
) -> None:
    config = build_config(config_file=None, flags={"upstream": "http://127.0.0.1:9/mcp", "host": host}, environ={})
    lines = banner(config, 8787)
    assert f" on {listening}" in lines[0]
    assert lines[-1] == f'  paste into your MCP client: url = "{url}"'


async def test_every_help_shows_examples_and_the_top_level_does_not_limit_serve_to_one_upstream() -> None:
    for command in ((), ("serve",), ("check-config",), ("demo",)):
        status, stdout, _ = await run_cli(*command, "--help")
        assert status == 0
        assert b"examples:" in stdout, command
        assert b"one upstream MCP server" not in stdout, command
    _, top, _ = await run_cli("--help")
    assert b"serve" in top
    assert b"one or more upstream MCP servers" in top


@pytest.mark.parametrize(
    "table",
    [
        "[server]\nmax_sessions = -1\n",
        "[server]\nkeepalive_interval = 0\n",
        "[server]\nsession_idle_ttl = 0\n",
        "[server]\nstate = 'postgres://db/sessions'\n",
        "[upstreams.b]\nurl = 'http://[::1/mcp'\n",
        "[upstreams.b]\nurl = 'http://127.0.0.1:9/mcp'\npath = '/metrics'\n",
        "[upstreams.b]\nurl = 'http://127.0.0.1:9/mcp'\npool_size = 0\n",
    ],
)
async def test_serve_refuses_what_check_config_refuses_with_the_same_line(tmp_path: Path, table: str) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f"{table}[upstreams.a]\nurl = 'http://127.0.0.1:9/mcp'\n")
    checked = await run_cli("check-config", str(config))
    served = await run_cli("serve", "--config", str(config), "--port", "0", "--state", ":memory:")
    assert checked[0] == served[0] == 2
    assert checked[2] == served[2]
    assert checked[2].count(b"\n") == 1
    assert b"Traceback" not in served[2]


def test_garbage_collection_is_tuned_once_the_proxy_is_up() -> None:
    """serve() freezes what lives for the whole process and collects young objects less often."""
    threshold = gc.get_threshold()
    try:
        tune_garbage_collection()
        assert gc.get_threshold() == (GC_THRESHOLD, *threshold[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def test_no_query_value_or_password_of_a_url_reaches_the_banner_the_log_or_check_config(
    tmp_path: Path,
) -> None:
    secret = "qsecret-4f1d9c"
    upstream = f"http://127.0.0.1:9/mcp?api_key={secret}"
    store = f"redis://:{secret}@127.0.0.1:9/0?password={secret}"
    status, stdout, stderr = await run_cli("check-config", "--upstream", upstream, "--state", store)
    assert status == 0, stderr
    assert secret.encode() not in stdout + stderr
    assert b"api_key=***" in stdout
    assert b"password=***" in stdout
    # serve's store error (nothing listens on port 9).
    status, stdout, stderr = await run_cli("serve", "--upstream", upstream, "--state", store, "--port", "0")
    assert status == 2
    assert b"cannot open the session store redis://***@127.0.0.1:9/0?password=***" in stderr
    assert secret.encode() not in stdout + stderr
    # The banner and the proxy.started log.
    process = await start_cli(
        "serve", "--upstream", upstream, "--state", ":memory:", "--port", "0", "--log-format", "json"
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        async with asyncio.timeout(20):
            banner_lines = b"".join([await process.stdout.readline() for _ in range(3)])
            while b"proxy.started" not in (line := await process.stderr.readline()):
                assert line, "the proxy exited before proxy.started"
        assert b"-> http://127.0.0.1:9/mcp?api_key=***" in banner_lines
        assert json.loads(line)["upstream_url"] == "http://127.0.0.1:9/mcp?api_key=***"
        assert secret.encode() not in banner_lines + line
    finally:
        process.kill()
        await process.wait()


async def test_login_tail_and_sessions_forget_print_urls_masked(tmp_path: Path) -> None:
    secret = "qsecret-4f1d9c"
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"[server]\nstate = ':memory:'\n[upstreams.a]\nurl = 'http://127.0.0.1:9/mcp?api_key={secret}'\nauth = 'oauth'\n"
    )
    status, stdout, stderr = await run_cli("login", "a", "--config", str(config), "--no-browser")
    assert status == 1
    assert b"cannot reach the upstream MCP server http://127.0.0.1:9/mcp?api_key=***" in stderr, stderr
    assert secret.encode() not in stdout + stderr
    status, stdout, stderr = await run_cli("tail", f"http://127.0.0.1:9/?token={secret}", "--give-up", "0")
    assert status == 1
    assert b"token=***" in stderr, stderr
    assert secret.encode() not in stdout + stderr
    session = "f" * 32
    status, stdout, stderr = await run_cli(
        "sessions", "forget", session, "--state", ":memory:", "--proxy", f"http://127.0.0.1:9/?token={secret}"
    )
    assert status == 1
    assert b"no proxy at http://127.0.0.1:9/?token=***" in stderr, stderr
    assert secret.encode() not in stdout + stderr
