"""Proxy-managed login end to end: ``login --no-browser`` completed by following the printed URL, then
``serve``, and the official SDK client without any auth calling tools through it.

The upstream is tests/oauth_server.py: the SDK's MCPServer with an auto-approving OAuth provider, in its
own process on a free 127.0.0.1 port, stopped by its PID.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp.shared.exceptions import MCPError

from mcp_heal_proxy.auth.endpoints import client_auth
from tests.conftest import HERE, MCP_HEADERS, ServerProcess, free_port, mcp_session, session_headers, wait_until
from tests.managed_login import CLI, REPO_ROOT, child_env, login, serve

NAME = "up"


class OAuthUpstream(ServerProcess):
    """tests/oauth_server.py in its own process."""

    name = "OAuth upstream"

    def __init__(self, *options: str) -> None:
        super().__init__()
        self.options = options

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "oauth_server.py"), "--port", str(self.port), *self.options]

    async def post(self, path: str, **form: str) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{self.port}{path}", data=form or None) as response,
        ):
            assert response.status == 200, await response.text()


OAuthUpstreams = Callable[..., Awaitable[OAuthUpstream]]


@pytest.fixture
async def oauth_upstream() -> AsyncIterator[OAuthUpstreams]:
    started: list[OAuthUpstream] = []

    async def start(*options: str) -> OAuthUpstream:
        server = OAuthUpstream(*options)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def write_config(directory: Path, url: str, *extra: str) -> Path:
    """The smallest config the issue promises is enough: url, path, auth = "oauth" (and no --state)."""
    config = directory / "proxy.toml"
    lines = [f"[upstreams.{NAME}]", f'url = "{url}"', 'path = "/mcp"', 'auth = "oauth"', *extra]
    config.write_text("\n".join(lines) + "\n")
    return config


def token_path(state_home: Path) -> Path:
    return state_home / "mcp-heal-proxy" / "oauth" / f"{NAME}.json"


def stored(state_home: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(token_path(state_home).read_text())
    return data


async def text_of(session: Any, tool: str, arguments: dict[str, Any]) -> str:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    text: str = result.content[0].text
    return text


async def revoke_access_token(upstream: OAuthUpstream, state_home: Path) -> None:
    """Revoke the stored access token at the authorization server (RFC 7009) as its client."""
    grant = stored(state_home)
    form = {"token": grant["access_token"], "client_id": grant["client_id"]}
    headers = {}
    if grant["client_secret"]:
        # The SDK's revocation endpoint wants the secret in the form whatever the method.
        form["client_secret"] = grant["client_secret"]
    if grant["auth_method"] == "client_secret_basic":
        pair = f"{grant['client_id']}:{grant['client_secret']}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{upstream.port}/revoke", data=form, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("audience", ["lenient", "strict"])
async def test_login_then_a_client_without_auth_calls_tools(
    oauth_upstream: OAuthUpstreams, tmp_path: Path, audience: str
) -> None:
    upstream = await oauth_upstream(*(["--strict-audience"] if audience == "strict" else []))
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, upstream.url)

    result = await login(config, NAME, env)

    assert result.returncode == 0, result.stderr
    assert result.url is not None
    assert "code_challenge=" in result.url
    assert "code_challenge_method=S256" in result.url
    assert result.callback_status == 200
    assert "Logged in to up" in result.stdout
    token_file = token_path(state_home)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    proxy = await serve(config, env)
    try:
        async with mcp_session(proxy.url) as session:
            assert await text_of(session, "echo", {"text": "through the proxy"}) == "through the proxy"
            assert await text_of(session, "whoami", {}) == stored(state_home)["client_id"]
    finally:
        await proxy.stop()
    stats = await upstream.stats()
    # The token is for the upstream: resource names it at /authorize and /token, never the proxy.
    assert stats["authorize_resources"] == [upstream.url]
    assert stats["token_resources"] == [upstream.url]
    assert (stats["registrations"], stats["authorizations"], stats["code_exchanges"]) == (1, 1, 1)
    # The login's discovery probe is the only request that went without a token.
    assert stats["initialize_tokens"][0] is None
    assert None not in stats["initialize_tokens"][1:]


async def test_refresh_after_expiry_heal_and_restart_need_no_new_login(
    oauth_upstream: OAuthUpstreams, tmp_path: Path
) -> None:
    """Access tokens live 1 s, and the upstream restarts between two calls: the second call needs a
    refresh and a heal, and neither sends the user through the browser again."""
    upstream = await oauth_upstream("--token-lifetime", "1", "--state-file", str(tmp_path / "as.json"))
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, upstream.url)
    assert (await login(config, NAME, env)).returncode == 0
    proxy = await serve(config, env)
    try:
        async with mcp_session(proxy.url) as session:
            assert await text_of(session, "echo", {"text": "one"}) == "one"
            first_token = stored(state_home)["access_token"]
            first_token_fingerprint = hashlib.sha256(first_token.encode()).hexdigest()[:16]
            before_restart = await upstream.stats()
            await upstream.restart()
            await wait_until(lambda: _expired(state_home), 10, "access token expired")
            assert await text_of(session, "echo", {"text": "two"}) == "two"
        log = await proxy.stop()
        assert "auth.token_refreshed" in log, log[-4000:]
        assert stored(state_home)["access_token"] != first_token
        # A restarted proxy finds the refreshed tokens on disk.
        proxy = await serve(config, env)
        async with mcp_session(proxy.url) as session:
            assert await text_of(session, "echo", {"text": "three"}) == "three"
    finally:
        await proxy.stop()
    assert (before_restart["authorizations"], before_restart["code_exchanges"]) == (1, 1)
    stats = await upstream.stats()  # counted since the restart
    assert stats["authorizations"] == 0, f"one login is one authorization: no browser again: {stats}"
    assert stats["code_exchanges"] == 0, stats
    assert stats["refreshes"] >= 1, stats
    # Counted since the restart: the heal's re-initialize and the restarted proxy's session (a heal
    # tried while the restarted upstream was still starting may add one), each with a token fresher
    # than the first session's.
    tokens = stats["initialize_tokens"]
    assert len(tokens) >= 2, stats
    assert None not in tokens, stats
    assert first_token_fingerprint not in tokens, stats


async def test_a_revoked_access_token_is_refreshed_once_across_requests_and_proxies(
    oauth_upstream: OAuthUpstreams, tmp_path: Path
) -> None:
    """Eight concurrent calls on each of two proxies sharing the login meet a 401: one refresh in all.

    Refresh tokens rotate, so a second refresh would spend a dead refresh token and fail a call.
    """
    upstream = await oauth_upstream()
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, upstream.url)
    assert (await login(config, NAME, env)).returncode == 0
    # One SQLite file serves one proxy: the second keeps its sessions in memory, and shares the login
    # (its tokens sit in the same state directory).
    proxies = [await serve(config, env), await serve(config, env, "--state", ":memory:")]
    try:
        async with mcp_session(proxies[0].url) as one, mcp_session(proxies[1].url) as two:
            await revoke_access_token(upstream, state_home)
            calls = [text_of(s, "echo", {"text": f"call {i}"}) for i in range(8) for s in (one, two)]
            answers = await asyncio.gather(*calls)
            assert sorted(answers) == sorted(f"call {i}" for i in range(8) for _ in (one, two))
    finally:
        for proxy in proxies:
            await proxy.stop()
    stats = await upstream.stats()
    assert stats["refreshes"] == 1
    assert stats["mcp_401"] >= 2, "both proxies met the revoked token"


async def test_a_revoked_refresh_token_gives_a_clear_error_not_a_challenge(
    oauth_upstream: OAuthUpstreams, tmp_path: Path
) -> None:
    upstream = await oauth_upstream()
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, upstream.url)
    assert (await login(config, NAME, env)).returncode == 0
    proxy = await serve(config, env)
    try:
        async with aiohttp.ClientSession() as http:
            session_id = await _raw_initialize(http, proxy.url)
            await upstream.post("/test/revoke-refresh-tokens")
            await revoke_access_token(upstream, state_home)
            call = {"jsonrpc": "2.0", "id": 42, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
            async with http.post(proxy.url, json=call, headers=session_headers(session_id)) as response:
                body = await response.json()
                assert response.status not in (401, 403)
                assert "WWW-Authenticate" not in response.headers
    finally:
        log = await proxy.stop()
    assert body["id"] == 42
    assert body["error"]["code"] == -32007
    assert "refused to refresh" in body["error"]["message"]
    assert "mcp-heal-proxy login up" in body["error"]["message"]
    assert "auth.refresh_refused" in log
    assert (await upstream.stats())["authorizations"] == 1


async def _raw_initialize(http: aiohttp.ClientSession, url: str) -> str:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
    }
    async with http.post(url, json=body, headers=MCP_HEADERS) as response:
        assert response.status == 200, await response.text()
        session_id = response.headers["Mcp-Session-Id"]
        await response.read()
    notification = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(url, json=notification, headers=session_headers(session_id)) as response:
        assert response.status == 202
    return session_id


async def test_serve_without_a_login_and_logout(oauth_upstream: OAuthUpstreams, tmp_path: Path) -> None:
    upstream = await oauth_upstream()
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, upstream.url)
    assert (await login(config, NAME, env)).returncode == 0
    grant = stored(state_home)
    out = await _cli(env, "logout", NAME, "--config", str(config))
    assert "Revoked the refresh token and access token at the authorization server" in out
    assert "Logged out of up" in out
    assert not token_path(state_home).exists()
    # RFC 7009: the authorization server no longer honours the refresh token.
    form = {"grant_type": "refresh_token", "refresh_token": grant["refresh_token"]}
    client = client_auth(form, grant["client_id"], grant.get("client_secret"), grant["auth_method"])
    async with (
        aiohttp.ClientSession() as http,
        http.post(grant["token_endpoint"], data=form, headers=client) as response,
    ):
        assert response.status == 400, await response.text()
        assert (await response.json())["error"] == "invalid_grant"
    proxy = await serve(config, env)
    try:
        body = {"jsonrpc": "2.0", "id": "init-7", "method": "initialize", "params": {}}
        async with (
            aiohttp.ClientSession() as http,
            http.post(proxy.url, json=body, headers=MCP_HEADERS) as response,
        ):
            answer = await response.json()
            assert response.status not in (401, 403)
            assert "WWW-Authenticate" not in response.headers
    finally:
        log = await proxy.stop()
    assert answer["id"] == "init-7"
    assert "not logged in" in answer["error"]["message"]
    assert "mcp-heal-proxy login up" in answer["error"]["message"]
    assert "auth.not_logged_in" in log


async def _cli(env: dict[str, str], *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO_ROOT
    )
    async with asyncio.timeout(30):
        out, errors = await process.communicate()
    assert process.returncode == 0, errors.decode()
    return out.decode()


async def test_step_up_asks_for_a_new_login_that_requests_the_wider_scope(
    oauth_upstream: OAuthUpstreams, tmp_path: Path
) -> None:
    upstream = await oauth_upstream("--scopes", "mcp,extra")
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, upstream.url)
    first = await login(config, NAME, env)
    assert first.returncode == 0
    assert first.url is not None
    assert "extra" not in first.url
    proxy = await serve(config, env)
    try:
        async with mcp_session(proxy.url) as session:
            assert await text_of(session, "echo", {"text": "before"}) == "before"
            await upstream.post("/test/step-up?scope=extra")
            with pytest.raises(MCPError, match=r"needs scope 'mcp extra'.*mcp-heal-proxy login up"):
                await session.call_tool("echo", {"text": "refused"})
            assert stored(state_home)["wanted_scope"] == "mcp extra"
            second = await login(config, NAME, env)
            assert second.returncode == 0
            assert second.url is not None
            assert "scope=mcp%20extra" in second.url
            # The running proxy picks the new login up; the client keeps its session.
            assert await text_of(session, "echo", {"text": "after"}) == "after"
    finally:
        await proxy.stop()
    stats = await upstream.stats()
    assert stats["authorizations"] == 2, "one new login, no loop"
    assert stats["mcp_403"] == 1


async def test_pre_registered_client(oauth_upstream: OAuthUpstreams, tmp_path: Path) -> None:
    port = free_port()
    upstream = await oauth_upstream(
        "--no-registration",
        "--static-client",
        "static-client:static-secret-value",
        "--static-redirect-uri",
        f"http://127.0.0.1:{port}/callback",
    )
    env = child_env(tmp_path / "state")
    without = write_config(tmp_path, upstream.url)
    refused = await login(without, NAME, env)
    assert refused.returncode == 1
    assert refused.url is None
    assert "no dynamic client registration" in refused.stderr
    assert "client_id" in refused.stderr
    config = write_config(
        tmp_path, upstream.url, 'client_id = "static-client"', 'client_secret = "${SECRET}"', f"callback_port = {port}"
    )
    env["SECRET"] = "static-secret-value"
    result = await login(config, NAME, env)
    assert result.returncode == 0, result.stderr
    proxy = await serve(config, env)
    try:
        async with mcp_session(proxy.url) as session:
            assert await text_of(session, "whoami", {}) == "static-client"
    finally:
        await proxy.stop()
    assert (await upstream.stats())["registrations"] == 0


async def test_login_checks_and_accepts_the_rfc9207_issuer(oauth_upstream: OAuthUpstreams, tmp_path: Path) -> None:
    upstream = await oauth_upstream("--send-iss")
    env = child_env(tmp_path / "state")
    result = await login(write_config(tmp_path, upstream.url), NAME, env)
    assert result.returncode == 0, result.stderr


async def test_tokens_never_reach_logs_config_output_metrics_or_error_bodies(
    oauth_upstream: OAuthUpstreams, tmp_path: Path
) -> None:
    upstream = await oauth_upstream("--token-lifetime", "1")
    state_home = tmp_path / "state"
    env = child_env(state_home)
    config = write_config(tmp_path, upstream.url)
    seen: list[str] = []
    login_result = await login(config, NAME, env)
    seen += [login_result.stdout, login_result.stderr]
    secrets = {stored(state_home)[k] for k in ("access_token", "refresh_token", "client_secret")}
    proxy = await serve(config, env, "--log-level", "debug", "--log-format", "json")
    try:
        async with mcp_session(proxy.url) as session:
            await text_of(session, "echo", {"text": "x"})
            await wait_until(lambda: _expired(state_home), 10, "access token expired")
            await text_of(session, "echo", {"text": "y"})  # refreshed on the way
            secrets |= {stored(state_home)[k] for k in ("access_token", "refresh_token")}
            await upstream.post("/test/revoke-refresh-tokens")
            await revoke_access_token(upstream, state_home)
            with pytest.raises(MCPError) as refused:
                await session.call_tool("echo", {"text": "z"})
            seen.append(str(refused.value))
        async with aiohttp.ClientSession() as http, http.get(proxy.url.replace("/mcp", "/metrics")) as response:
            seen.append(await response.text())
    finally:
        seen.append(await proxy.stop())
    seen.append(await _cli(env, "check-config", str(config)))
    assert all(secrets), "the grant had tokens and a client secret"
    for text in seen:
        for secret in secrets:
            assert secret not in text


def _expired(state_home: Path) -> bool:
    expires_at: float = stored(state_home)["expires_at"]
    return expires_at < time.time()
