"""Codex CLI 0.169 logs in through the proxy (``codex mcp login --no-browser``), then ``codex exec``
calls the MCP tool twice with an upstream restart and a token expiry in between, offline.

The upstream is the SDK server behind its own authorization server (tests/oauth_server.py), lenient and
strict audience; the proxy is ``mcp-heal-proxy serve``. Codex probes the MCP URL with a GET and asks for
authorization-server metadata on the origin; through the proxy both lead it to the stand-in. The
counterpart (a proxy without pass-through) fails at the login.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import ProxyFactory as InProcessProxyFactory
from tests.conftest import wait_until
from tests.interop.clients import CODEX_MCP_SERVER_NAME, codex_environment, run_codex
from tests.interop.conftest import NODE_MODULES, NodeEnv, ProxyFactory, missing_prerequisite
from tests.interop.fake_model import FIRST_CALL_ID, FIRST_TEXT, SECOND_CALL_ID, SECOND_TEXT
from tests.oauth_clients import OAuthUpstream, follow_to_redirect_uri
from tests.oauth_server import EXPIRY_LEEWAY

pytestmark = pytest.mark.interop

CODEX_OAUTH_BINARY = Path(
    os.environ.get(
        "CODEX_OAUTH_BINARY",
        NODE_MODULES / "@openai/codex-oauth-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex",
    )
)
CREDENTIALS_IN_FILE = 'mcp_oauth_credentials_store = "file"\n'
# Codex 0.169 asks before running an MCP tool unless told otherwise; `codex exec` cannot ask.
APPROVE_TOOLS = 'default_tools_approval_mode = "approve"\n'
LOGIN_TIMEOUT = 40.0
TOKEN_LIFETIME = 2.0
_AUTHORIZATION_URL = re.compile(r"(https?://\S+code_challenge=\S+)")


@pytest.fixture
def codex_oauth_binary(node_env: NodeEnv) -> Path:
    """The Codex 0.169.0 binary from the pinned npm package."""
    if not CODEX_OAUTH_BINARY.is_file():
        missing_prerequisite(f"Codex 0.169 binary missing at {CODEX_OAUTH_BINARY} (only linux-x64 is pinned)")
    return CODEX_OAUTH_BINARY


@pytest.fixture
async def oauth_upstream(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[OAuthUpstream]]]:
    started: list[OAuthUpstream] = []

    async def start(*options: str) -> OAuthUpstream:
        server = OAuthUpstream(tmp_path, *options)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


async def codex_login(
    binary: Path, home: Path, mcp_url: str, follow: Callable[[str, str], Awaitable[str]] = follow_to_redirect_uri
) -> tuple[int, str]:
    """``codex mcp login --no-browser``: follow the URL it prints (``follow``: a browser that goes from
    the URL to the redirect URI, signing in on the way if there are pages), paste the callback URL back."""
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    config = f'{CREDENTIALS_IN_FILE}[mcp_servers.{CODEX_MCP_SERVER_NAME}]\nurl = "{mcp_url}"\n'
    (home / ".codex" / "config.toml").write_text(config)
    process = await asyncio.create_subprocess_exec(
        str(binary),
        "mcp",
        "login",
        CODEX_MCP_SERVER_NAME,
        "--no-browser",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=codex_environment(home),
    )
    assert process.stdin is not None
    assert process.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(LOGIN_TIMEOUT):
            while line := await process.stdout.readline():
                text = line.decode(errors="replace")
                output.append(text)
                found = _AUTHORIZATION_URL.search(text)
                if found is not None:
                    url = found.group(1)
                    redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
                    callback = await follow(url, redirect_uri)
                    process.stdin.write(callback.encode() + b"\n")
                    await process.stdin.drain()
            returncode = await process.wait()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return returncode, "".join(output)


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
async def test_codex_logs_in_through_proxy_and_its_second_call_survives_restart_and_refresh(
    codex_oauth_binary: Path,
    oauth_upstream: Callable[..., Awaitable[OAuthUpstream]],
    proxy_process: ProxyFactory,
    tmp_path: Path,
    strict: bool,
) -> None:
    options = ["--token-lifetime", str(TOKEN_LIFETIME)] + (["--strict-audience"] if strict else [])
    upstream = await oauth_upstream(*options)
    proxy = await proxy_process(upstream.url)
    home = tmp_path / "home"
    returncode, output = await codex_login(codex_oauth_binary, home, proxy.url)
    assert returncode == 0, output
    assert "Successfully logged in" in output, output

    async def restart_and_expire() -> None:
        expires = time.time() + TOKEN_LIFETIME + EXPIRY_LEEWAY + 1.5  # the server rounds expiry up to a second
        await upstream.restart()
        await wait_until(lambda: time.time() > expires, TOKEN_LIFETIME + 8, "access token expired")

    run = await run_codex(
        codex_oauth_binary,
        home,
        proxy.url,
        restart_and_expire,
        extra_config=CREDENTIALS_IN_FILE,
        server_config=APPROVE_TOOLS,
    )
    assert run.model.restarted, run.explain()
    first = run.output_of(FIRST_CALL_ID)
    assert first is not None, run.explain()
    assert FIRST_TEXT in first, run.explain()
    second = run.output_of(SECOND_CALL_ID)
    assert second is not None, run.explain()
    assert SECOND_TEXT in second, run.explain() + "\n--- proxy log:\n" + proxy.log()[-6000:]
    assert run.returncode == 0, run.explain()
    assert proxy.healed_on("http_404"), proxy.log()
    stats = await upstream.stats()  # since the restart
    assert stats["refreshes"] >= 1, "Codex refreshed its token during the run"
    assert set(stats["token_resources"]) == {upstream.url}
    issued = json.loads(await asyncio.to_thread(upstream.state_file.read_text))
    log = proxy.log()
    for token in [*issued["access"], *issued["refresh"]]:
        assert token not in log


async def test_codex_cannot_log_in_through_a_proxy_without_pass_through(
    codex_oauth_binary: Path,
    oauth_upstream: Callable[..., Awaitable[OAuthUpstream]],
    start_proxy: InProcessProxyFactory,
    tmp_path: Path,
) -> None:
    upstream = await oauth_upstream()
    proxy = await start_proxy(upstream.url, oauth_pass_through="off")
    returncode, output = await codex_login(codex_oauth_binary, tmp_path / "home", proxy.url)
    assert returncode != 0, output
    assert "Successfully logged in" not in output, output
    assert (await upstream.stats())["authorizations"] == 0
