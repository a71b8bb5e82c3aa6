"""Every hint the proxy prints is a command that works when pasted: each test takes the command out of
the message a user sees, runs it (a real process, bounded, on 127.0.0.1), and checks that it did what
the hint promised. ``TOKEN`` in a hint stands for the proxy's token, which no message may show."""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from tests.conftest import MCP_HEADERS, ProxyFactory, UpstreamProcess
from tests.managed_login import CLI, child_env, follow_authorization, serve
from tests.test_managed_login import NAME, OAuthUpstreams, oauth_upstream, write_config

__all__ = ["oauth_upstream"]  # the fixture, used by name below

TOKEN = "hint-test-token-9d2c4e7a"
_COMMAND = re.compile(r"`((?:MCP_HEAL_PROXY_TOKEN=TOKEN )?mcp-heal-proxy [^`]+)`")
_URL_LINE = re.compile(r"^https?://\S*code_challenge=\S*$")


def hinted(text: str) -> str:
    """The one command a message names (between backquotes)."""
    commands = _COMMAND.findall(text)
    assert len(commands) == 1, text
    command: str = commands[0]
    return command


def as_process(command: str, token: str = TOKEN) -> tuple[list[str], dict[str, str]]:
    """A pasted command line as argv for this checkout's CLI, and the variables it sets."""
    words = shlex.split(command)
    variables: dict[str, str] = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        variables[name] = token if value == "TOKEN" else value
    assert words[0] == "mcp-heal-proxy", command
    return [*CLI, *words[1:]], variables


async def run(argv: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 30.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(env), cwd=cwd
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_not_logged_in_hint_logs_in_when_pasted_in_another_directory(
    oauth_upstream: OAuthUpstreams, tmp_path: Path
) -> None:
    upstream = await oauth_upstream()
    env = child_env(tmp_path / "state-home")
    config = write_config(tmp_path, upstream.url)
    state = tmp_path / "elsewhere" / "sessions.db"
    state.parent.mkdir()
    proxy = await serve(config, env, "--state", str(state))
    try:
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            async with http.post(proxy.url, json=body, headers=MCP_HEADERS) as response:
                message = (await response.json())["error"]["message"]
            command = hinted(message)
            assert command == shlex.join(
                ["mcp-heal-proxy", "login", NAME, "--config", str(config), "--state", str(state)]
            )
            # As pasted: a browser "opens" (BROWSER=true), the URL printed is followed as a browser would.
            argv, _ = as_process(command)
            cwd = tmp_path / "another-directory"
            cwd.mkdir()
            login = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**env, "BROWSER": "true"},
                cwd=cwd,
            )  # fmt: skip
            try:
                assert login.stdout is not None
                async with asyncio.timeout(30):
                    while not _URL_LINE.match(line := (await login.stdout.readline()).decode().strip()):
                        assert line, "login printed no authorization URL"
                    waiting = (await login.stdout.readline()).decode()
                    callback = re.search(r"redirect to (http://127\.0\.0\.1:\d+/\S+)", waiting)
                    assert callback is not None, waiting
                    # A stale tab's answer (not this attempt's state) gets the same command to start again.
                    async with http.get(callback.group(1), params={"state": "stale", "code": "x"}) as stale:
                        assert stale.status == 400
                        assert (await stale.text()).endswith(f"start again with: {command}")
                    assert await follow_authorization(line) == 200
                    _, errors = await login.communicate()
            finally:
                if login.returncode is None:
                    login.kill()
                    await login.wait()
            assert login.returncode == 0, errors
            # The proxy now finds the tokens the hinted login stored.
            async with http.post(proxy.url, json=body | {"params": _INIT_PARAMS}, headers=MCP_HEADERS) as response:
                assert response.status == 200, await response.text()
    finally:
        log = await proxy.stop()
    (logged,) = [line for line in log.splitlines() if "auth.not_logged_in" in line]
    assert hinted(logged) == command


_INIT_PARAMS = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}


async def test_login_to_an_upstream_that_needs_none_says_so(sse_upstream: UpstreamProcess, tmp_path: Path) -> None:
    config = write_config(tmp_path, sse_upstream.url)
    status, out, err = await run(
        [*CLI, "login", NAME, "--config", str(config), "--no-browser"], child_env(tmp_path / "h"), tmp_path
    )
    assert status == 1
    assert "this upstream asks for no login" in err, err
    assert "404" not in out + err


async def test_the_token_hints_of_tail_and_sessions_forget_work_with_the_token_filled_in(
    sse_upstream: UpstreamProcess, start_proxy: ProxyFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(sse_upstream.url, token=TOKEN)
    base = proxy.url.removesuffix("/mcp")
    env = {k: v for k, v in child_env(tmp_path / "h").items() if k != "MCP_HEAL_PROXY_TOKEN"}
    session_id = await _initialize(http, proxy.url)
    # sessions forget: refused without the token; its hint, token filled in, ends the session.
    status, _, err = await run(
        [*CLI, "sessions", "forget", session_id, "--state", ":memory:", "--proxy", base], env, tmp_path
    )
    assert status == 1, err
    assert "give --token" not in err
    command = hinted(err)
    assert command.startswith("MCP_HEAL_PROXY_TOKEN=TOKEN mcp-heal-proxy sessions forget")
    argv, variables = as_process(command)
    status, out, err = await run(argv, {**env, **variables}, tmp_path)
    assert (status, err) == (0, "")
    assert out.startswith(f"ended session {session_id[:8]}"), out
    # tail: refused without the token; its hint, token filled in, follows the feed.
    status, _, err = await run([*CLI, "tail", base, "--give-up", "5"], env, tmp_path)
    assert status == 1, err
    command = hinted(err)
    assert command == f"MCP_HEAL_PROXY_TOKEN=TOKEN mcp-heal-proxy tail {base} --give-up 5"
    argv, variables = as_process(command)
    tail = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env={**env, **variables}, cwd=tmp_path
    )
    try:
        assert tail.stderr is not None
        async with asyncio.timeout(20):
            first = (await tail.stderr.readline()).decode()
        assert first.startswith(f"following {base}"), first
    finally:
        tail.kill()
        await tail.wait()


async def _initialize(http: aiohttp.ClientSession, url: str) -> str:
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {TOKEN}"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": _INIT_PARAMS}
    async with http.post(url, json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        await response.read()
        return response.headers["Mcp-Session-Id"]


async def test_the_did_you_mean_hint_of_sessions_runs_forget(tmp_path: Path) -> None:
    env = child_env(tmp_path / "h")
    store = tmp_path / "sessions.db"
    status, _, err = await run([*CLI, "sessions", "list", "3f9c2a1b", "--state", str(store)], env, tmp_path)
    assert status == 2
    command = hinted(err)
    assert command == shlex.join(["mcp-heal-proxy", "sessions", "forget", "3f9c2a1b", "--state", str(store)])
    argv, _ = as_process(command)
    status, _, err = await run(argv, env, tmp_path)
    # The command ran: its answer is about the store (none here), not about the command line.
    assert "usage:" not in err
    assert "unexpected argument" not in err
    assert f"no session store at {store}" in err
